"""Image processor of the anomaly models: the resize and normalisation the scorer / learner were fitted with, and
the post-processing of their maps into per-image results (maps at the original size, scores, OK / NG verdicts,
defect masks from the calibrated thresholds)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .configuration_cadmtl_anomaly import IMAGENET_MEAN, IMAGENET_STD

OK, NG = "OK", "NG"

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode, by the rules of `dataset_scripts.images.to_rgb` (a copy: Hub files are
    self-contained; a test keeps the two equal): grayscale replicated; palettes, CMYK and other colour spaces by
    Pillow; 16-bit scaled by `255 / 65535` (32-bit integer and float too when a value exceeds 255, else taken as
    8-bit); alpha composited onto white."""
    if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode in _SIXTEEN_BIT_MODES or np.nanmax(values, initial=0) > 255 else 255.0
        gray = np.clip(np.nan_to_num(values) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_uint8_chw(image: Any) -> torch.Tensor:
    """(3, H, W) uint8 from a PIL image (any mode, by `to_rgb`), an (H, W[, C]) uint8 array or a (C, H, W) tensor."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(to_rgb(image), dtype=np.uint8).copy()).permute(2, 0, 1)
    tensor = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))
    if tensor.ndim == 2:
        tensor = tensor[None]
    elif tensor.ndim == 3 and tensor.shape[0] not in (1, 3, 4) and tensor.shape[-1] in (1, 3, 4):
        tensor = tensor.permute(2, 0, 1)  # HWC -> CHW
    if tensor.ndim != 3:
        raise ValueError(f"expected an image (H, W), (H, W, C) or (C, H, W); got shape {tuple(tensor.shape)}")
    if tensor.dtype != torch.uint8:
        raise ValueError(f"array and tensor images must be uint8 (0-255); got {tensor.dtype}")
    tensor = tensor[:3] if tensor.shape[0] >= 3 else tensor[:1].expand(3, -1, -1)
    return tensor


def pixel_values_from_images(
    images: Sequence[Any],
    size: tuple[int, int],
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """(B, 3, H, W) float32: each image resized (bilinear, antialiased) to `size` = (H, W) and normalised."""
    resized = [
        F.interpolate(
            _to_uint8_chw(image)[None].float() / 255.0,
            size=tuple(size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
        for image in images
    ]
    batch = torch.stack(resized)
    mean = torch.tensor(image_mean, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(image_std, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - mean) / std


def image_size_of(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image, an (H, W[, C]) array or a (C, H, W) tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    height, width = _to_uint8_chw(image).shape[-2:]
    return int(height), int(width)


class AnomalyImageProcessor(BaseImageProcessor):
    """Resize to the model's `size` (bilinear, antialiased, as the bank / learner was fitted) and normalise.

    Args:
        size (`dict`): {"height", "width"} the model scores at.
        image_mean, image_std: the normalisation.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.size = dict(size) if size is not None else {"height": 224, "width": 224}
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]

    @classmethod
    def from_model_config(cls, config: Any) -> AnomalyImageProcessor:
        """The processor of a `PatchMemoryConfig` / `AnomalyLearnerConfig` (its image size and normalisation)."""
        side = config.image_size if config.image_size is not None else 224
        height, width = (side, side) if isinstance(side, int) else side
        return cls(
            size={"height": int(height), "width": int(width)},
            image_mean=config.image_mean,
            image_std=config.image_std,
        )

    def __call__(self, images: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def preprocess(
        self, images: Any, return_tensors: str | None = "pt", size: dict[str, int] | None = None
    ) -> BatchFeature:
        """One image or a list (PIL images of any mode, uint8 arrays HWC, uint8 tensors CHW) ->
        {"pixel_values": (B, 3, H, W)}."""
        if isinstance(images, Image.Image) or (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim in (2, 3)
        ):
            images = [images]
        size = size or self.size
        pixel_values = pixel_values_from_images(
            list(images), (size["height"], size["width"]), self.image_mean, self.image_std
        )
        if return_tensors == "np":
            pixel_values = pixel_values.numpy()
        return BatchFeature({"pixel_values": pixel_values})

    def post_process_anomaly_maps(
        self,
        outputs: Any,
        target_sizes: Sequence[tuple[int, int]] | None = None,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
    ) -> list[dict[str, Any]]:
        """Per image: `anomaly_map` (H, W) float32, bilinear to its `target_sizes` entry (else the model size),
        `score` (float), and with the thresholds (anomalous: value >= threshold; the model config's calibrated
        `image_threshold` / `pixel_threshold`, see `model.thresholds`) `verdict` ("OK" / "NG") and `mask` (H, W) bool.

        `outputs`: an `AnomalyOutput`, or a dict / tuple holding `anomaly_maps` (B, h, w) and `image_scores` (B,)
        (e.g. the outputs of an onnxruntime session)."""
        if isinstance(outputs, (tuple, list)):
            maps, scores = outputs[0], outputs[1]
        else:
            maps, scores = outputs["anomaly_maps"], outputs["image_scores"]
        maps = torch.as_tensor(maps).float().cpu()
        scores = torch.as_tensor(scores).float().cpu()
        if target_sizes is not None and len(target_sizes) != maps.shape[0]:
            raise ValueError(f"got {len(target_sizes)} target sizes for {maps.shape[0]} anomaly maps")
        results = []
        for index in range(maps.shape[0]):
            amap = maps[index]
            if target_sizes is not None and tuple(target_sizes[index]) != tuple(amap.shape):
                amap = F.interpolate(
                    amap[None, None], size=tuple(target_sizes[index]), mode="bilinear", align_corners=False
                )[0, 0]
            result: dict[str, Any] = {"anomaly_map": amap, "score": float(scores[index])}
            if image_threshold is not None:
                result["verdict"] = NG if result["score"] >= image_threshold else OK
            if pixel_threshold is not None:
                result["mask"] = amap >= pixel_threshold
            results.append(result)
        return results


AnomalyImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["AnomalyImageProcessor", "image_size_of", "pixel_values_from_images", "to_rgb"]
