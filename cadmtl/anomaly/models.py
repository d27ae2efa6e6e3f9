"""The saved normal-only anomaly models, found by their config's `model_type`, and scoring one image with them.

    from cadmtl.anomaly.models import load_anomaly_model, predict_image
    model = load_anomaly_model("outputs/ad-demo/model")  # a PatchMemoryScorer or an AnomalyLearner
    picture, score, verdict = predict_image(model, image)
    picture, score, verdict = predict_image(model, image, anomaly_processor(model, tile_size=512, tile_overlap=64))

`cadmtl anomaly evaluate / predict`, `cadmtl export onnx` and the demo app's anomaly tab load through here; a
new anomaly model adds its class to `ANOMALY_MODELS`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from tqdm.auto import tqdm

from cadmtl.anomaly.learner import AnomalyLearner
from cadmtl.anomaly.patch_memory import PatchMemoryScorer
from cadmtl.model_kinds import ANOMALY_MODEL_KINDS, load_pretrained, require_model_kind
from cadmtl.pictures.overlays import draw_anomaly_map
from modeling_cadmtl_anomaly import AnomalyImageProcessor, AnomalyLearnerConfig, PatchMemoryConfig

__all__ = [
    "ANOMALY_MODELS",
    "NG",
    "OK",
    "UNCALIBRATED",
    "AnomalyInspection",
    "anomaly_processor",
    "image_verdict",
    "inspect_image",
    "load_anomaly_model",
    "map_value_range",
    "predict_image",
    "score_images",
]

OK, NG = "OK", "NG"
# The verdict of a model saved without thresholds (no images to calibrate on): never a silent blank.
UNCALIBRATED = "uncalibrated"
AnomalyModel = PatchMemoryScorer | AnomalyLearner
# config.json's model_type -> the class that loads (and fits or trains) it.
ANOMALY_MODELS: dict[str, type[AnomalyModel]] = {
    PatchMemoryConfig.model_type: PatchMemoryScorer,
    AnomalyLearnerConfig.model_type: AnomalyLearner,
}


def load_anomaly_model(path: str | os.PathLike) -> AnomalyModel:
    """A saved patch-memory scorer (`cadmtl anomaly fit`) or learner (`cadmtl anomaly train`) in eval mode, told
    by its config's `model_type`; both score with `score(pixel_values) -> (maps, image scores)` at `image_size`.

    Raises:
        ModelLoadError: `path` does not exist, holds another kind of model (the message names the command that
            serves it) or weights that do not fit the model.
    """
    info = require_model_kind(path, *ANOMALY_MODEL_KINDS)
    model_class = PatchMemoryScorer if info.model_type is None else ANOMALY_MODELS[info.model_type]
    return load_pretrained(model_class, path, info.holds).eval()


def image_verdict(model: AnomalyModel, score: float) -> str:
    """ "NG" at or above the calibrated image threshold, else "OK"; "uncalibrated" for a model without one."""
    return UNCALIBRATED if model.image_threshold is None else (NG if score >= model.image_threshold else OK)


def map_value_range(model: AnomalyModel, maps: Sequence[np.ndarray]) -> tuple[float, float]:
    """A fixed colour range for every picture of a run: 0 to twice the pixel threshold (else the 99th percentile)."""
    if model.pixel_threshold:
        return 0.0, 2.0 * float(model.pixel_threshold)
    return 0.0, float(np.percentile(np.concatenate([m.ravel() for m in maps]), 99)) or 1.0


def anomaly_processor(
    model: AnomalyModel, tile_size: int | None = None, tile_overlap: int | None = None
) -> AnomalyImageProcessor:
    """The processor `model` scores through: its size and normalisation, and the tile settings it was fitted with
    (`config.tile_size` / `tile_overlap`), which `tile_size` / `tile_overlap` (`--tile-size` / `--tile-overlap`)
    override. Raises a one-line `ValueError` naming the option for bad tile settings."""
    return AnomalyImageProcessor.from_model_config(
        model.config, tile_size=tile_size, tile_overlap=tile_overlap
    )


def score_images(
    model: AnomalyModel,
    images: Sequence[Image.Image],
    processor: AnomalyImageProcessor | None = None,
    batch_size: int = 8,
    desc: str | None = None,
) -> tuple[list[float], list[np.ndarray]]:
    """Image scores and anomaly maps (float32, at each image's own size) of `images` through the processor's one
    scoring path (`AnomalyImageProcessor.predict`: whole images, or tiles stitched when it has a `tile_size`),
    `batch_size` images at a time; with `desc`, a progress bar (minutes for a few hundred tiled images)."""
    processor = anomaly_processor(model) if processor is None else processor
    config = model.config
    scores, maps = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=desc is None, leave=False):
        chunk = list(images[start : start + batch_size])
        outputs = processor.predict(
            model.predict,
            chunk,
            image_score=config.image_score,
            top_fraction=config.top_fraction,
            batch_size=batch_size,
        )
        for image, amap, score in zip(chunk, outputs["anomaly_maps"], outputs["image_scores"]):
            size = (image.height, image.width)
            if tuple(amap.shape) != size:
                amap = F.interpolate(amap[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            maps.append(amap.numpy().astype(np.float32))
            scores.append(float(score))
    return scores, maps


@dataclass
class AnomalyInspection:
    """What the demo app's anomaly tab computes for one image: the heat-map picture it shows, the image score,
    the verdict ("OK" / "NG" / "uncalibrated"), and the anomaly map (float32, H x W of the image) it was drawn
    from (`benchmarks/demo_route.py` checks where the map peaks)."""

    picture: Image.Image
    score: float
    verdict: str
    anomaly_map: np.ndarray


@torch.no_grad()
def inspect_image(
    model: AnomalyModel, image: Image.Image, processor: AnomalyImageProcessor | None = None
) -> AnomalyInspection:
    """One RGB image -> its `AnomalyInspection`; `predict_image` without dropping the map."""
    (score,), (amap,) = score_images(model, [image], processor)
    predicted = None if model.pixel_threshold is None else (amap >= model.pixel_threshold).astype(np.uint8)
    picture = draw_anomaly_map(image, amap, map_value_range(model, [amap]), predicted_mask=predicted)
    return AnomalyInspection(picture, score, image_verdict(model, score), amap)


@torch.no_grad()
def predict_image(
    model: AnomalyModel, image: Image.Image, processor: AnomalyImageProcessor | None = None
) -> tuple[Image.Image, float, str]:
    """One RGB image -> (heat-map picture with the thresholded defect contour, image score, "OK" / "NG", or
    "uncalibrated" for a model without thresholds): `cadmtl anomaly predict` and the demo app's anomaly tab.
    `processor` (default `anomaly_processor(model)`, the model's saved tile settings) decides tiles."""
    inspection = inspect_image(model, image, processor)
    return inspection.picture, inspection.score, inspection.verdict
