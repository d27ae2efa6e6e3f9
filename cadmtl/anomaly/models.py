"""The saved normal-only anomaly models, found by their config's `model_type`, and scoring one image with them.

    from cadmtl.anomaly.models import load_anomaly_model, predict_image
    model = load_anomaly_model("outputs/ad-demo/model")  # a PatchMemoryScorer or an AnomalyLearner
    picture, score, verdict = predict_image(model, image)

`cadmtl anomaly evaluate / predict`, `cadmtl export onnx` and the demo app's anomaly tab load through here; a
new anomaly model adds its class to `ANOMALY_MODELS`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image
from torch.nn import functional as F

from cadmtl.anomaly.data import to_pixel_values
from cadmtl.anomaly.learner import AnomalyLearner
from cadmtl.anomaly.patch_memory import PatchMemoryScorer
from cadmtl.model_kinds import ANOMALY_MODEL_KINDS, load_pretrained, require_model_kind
from cadmtl.pictures.overlays import draw_anomaly_map
from modeling_cadmtl_anomaly import AnomalyLearnerConfig, PatchMemoryConfig

__all__ = [
    "ANOMALY_MODELS",
    "NG",
    "OK",
    "UNCALIBRATED",
    "image_verdict",
    "load_anomaly_model",
    "map_value_range",
    "predict_image",
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


def predict_image(model: AnomalyModel, image: Image.Image) -> tuple[Image.Image, float, str]:
    """One RGB image -> (heat-map picture with the thresholded defect contour, image score, "OK" / "NG", or
    "uncalibrated" for a model without thresholds): `cadmtl anomaly predict` and the demo app's anomaly tab."""
    pixel_values = to_pixel_values([image], model.image_size, model.image_mean, model.image_std)
    maps, scores = model.score(pixel_values)
    amap = F.interpolate(maps[:1, None], size=(image.height, image.width), mode="bilinear")[0, 0].numpy()
    predicted = None if model.pixel_threshold is None else (amap >= model.pixel_threshold).astype(np.uint8)
    picture = draw_anomaly_map(image, amap, map_value_range(model, [amap]), predicted_mask=predicted)
    score = float(scores[0])
    return picture, score, image_verdict(model, score)
