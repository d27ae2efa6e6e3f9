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
from .features_cadmtl_anomaly import check_tile_settings, image_scores, stitch, tile_boxes, tile_canvas

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


def _model_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(anomaly maps, image scores) of an `AnomalyOutput`, a dict or a tuple (e.g. onnxruntime's outputs)."""
    if isinstance(outputs, (tuple, list)):
        maps, scores = outputs[0], outputs[1]
    else:
        maps, scores = outputs["anomaly_maps"], outputs["image_scores"]
    return torch.as_tensor(maps).float().cpu(), torch.as_tensor(scores).float().cpu()


class AnomalyImageProcessor(BaseImageProcessor):
    """Resize to the model's `size` (bilinear, antialiased, as the bank / learner was fitted) and normalise; with
    `tile_size`, cut high-resolution images into overlapping tiles and stitch the tiles' maps (`predict`).

    Args:
        size (`dict`): {"height", "width"} the model scores at.
        image_mean, image_std: the normalisation.
        tile_size, tile_overlap (`int`, *optional*): tiles of `tile_size` pixels of the original image overlapping
            by `tile_overlap` (see `predict`); None: whole images.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        tile_size: int | None = None,
        tile_overlap: int | None = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_tile_settings(tile_size, tile_overlap)
        self.size = dict(size) if size is not None else {"height": 224, "width": 224}
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.tile_size = tile_size
        self.tile_overlap = int(tile_overlap or 0)

    @classmethod
    def from_model_config(
        cls, config: Any, tile_size: int | None = None, tile_overlap: int | None = None
    ) -> AnomalyImageProcessor:
        """The processor of a `PatchMemoryConfig` / `AnomalyLearnerConfig` (its image size and normalisation, and
        the tile settings it was fitted with); `tile_size` / `tile_overlap` override the saved tile settings."""
        side = config.image_size if config.image_size is not None else 224
        height, width = (side, side) if isinstance(side, int) else side
        if tile_size is None:
            tile_size = getattr(config, "tile_size", None)
            tile_overlap = getattr(config, "tile_overlap", 0) if tile_overlap is None else tile_overlap
        return cls(
            size={"height": int(height), "width": int(width)},
            image_mean=config.image_mean,
            image_std=config.image_std,
            tile_size=tile_size,
            tile_overlap=tile_overlap or 0,
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

    def tiles(self, image: Any) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """One image cut into the processor's tiles: (pixel values (N, 3, h, w) at `size`, the tiles' (x0, y0, x1,
        y1) boxes in the image's pixels, from `tile_boxes`). Without `tile_size`: the whole image as one tile."""
        pixels = _to_uint8_chw(image)
        height, width = pixels.shape[-2:]
        if self.tile_size is None:
            boxes = [(0, 0, int(width), int(height))]
        else:
            boxes = tile_boxes(int(height), int(width), self.tile_size, self.tile_overlap)
        crops = [pixels[:, y0:y1, x0:x1] for x0, y0, x1, y1 in boxes]
        size = (self.size["height"], self.size["width"])
        return pixel_values_from_images(crops, size, self.image_mean, self.image_std), boxes

    @torch.no_grad()
    def predict(
        self,
        model: Any,
        images: Any,
        *,
        image_score: str | None = None,
        top_fraction: float | None = None,
        batch_size: int = 8,
    ) -> dict[str, Any]:
        """The one scoring path of the anomaly models (`cadmtl anomaly fit` calibration / evaluate / predict, the
        demo app, the ONNX predictor): `images` (one or a list) through `model` (called on (n, 3, H, W) pixel values,
        returning an `AnomalyOutput`, a dict or a tuple of maps and scores: the model or an onnxruntime session's
        `run`) in batches of `batch_size`.

        Without `tile_size`, each image is resized to `size` and the model's maps and scores are returned. With
        `tile_size`, each image is cut into overlapping tiles (`tile_boxes`: a regular grid, the last row / column
        ending at the edge; a side shorter than a tile is one tile spanning it, never padded), every tile is
        scored at `size` (`batch_size` tiles per call, one image at a time), the tiles' maps are stitched over
        the whole image at the model's resolution with overlaps averaged (`tile_canvas`, `stitch`), and the image
        score is `image_score` ("max" or "top_mean" of the top `top_fraction`; default the model config's, else
        "top_mean" of 1 %) of the stitched map.

        Returns `{"anomaly_maps": [(h, w) float32 per image], "image_scores": (B,) float32}`; the maps are at
        the model's resolution (`post_process_anomaly_maps(..., target_sizes=...)` resizes them to the images).
        """
        if isinstance(images, Image.Image) or (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim in (2, 3)
        ):
            images = [images]
        images = list(images)
        config = getattr(model, "config", None) or getattr(getattr(model, "__self__", None), "config", None)
        image_score = image_score or getattr(config, "image_score", "top_mean")
        top_fraction = top_fraction or getattr(config, "top_fraction", 0.01)
        if self.tile_size is None:
            maps, scores = [], []
            for start in range(0, len(images), batch_size):
                pixel_values = self.preprocess(images[start : start + batch_size])["pixel_values"]
                batch_maps, batch_scores = _model_outputs(model(pixel_values))
                maps.extend(batch_maps)
                scores.append(batch_scores)
            return {"anomaly_maps": maps, "image_scores": torch.cat(scores) if scores else torch.zeros(0)}
        maps, scores = [], []
        for image in images:  # one image's tiles at a time: memory stays bounded on large photos
            pixel_values, boxes = self.tiles(image)
            tile_maps = torch.cat(
                [
                    _model_outputs(model(pixel_values[i : i + batch_size]))[0]
                    for i in range(0, len(pixel_values), batch_size)
                ]
            )
            height, width = image_size_of(image)
            placed, canvas = tile_canvas(boxes, height, width, tuple(tile_maps.shape[-2:]))
            stitched = stitch(tile_maps, placed, canvas)
            maps.append(stitched)
            scores.append(image_scores(stitched[None], image_score, top_fraction)[0])
        return {"anomaly_maps": maps, "image_scores": torch.stack(scores) if scores else torch.zeros(0)}

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

        `outputs`: an `AnomalyOutput`, or a dict / tuple holding `anomaly_maps` (B, h, w) or a list of (h, w) maps
        (`predict` with tiles: one size per image) and `image_scores` (B,) (e.g. the outputs of an onnxruntime
        session)."""
        if isinstance(outputs, (tuple, list)):
            maps, scores = outputs[0], outputs[1]
        else:
            maps, scores = outputs["anomaly_maps"], outputs["image_scores"]
        maps = [torch.as_tensor(amap).float().cpu() for amap in maps]
        scores = torch.as_tensor(scores).float().cpu()
        if target_sizes is not None and len(target_sizes) != len(maps):
            raise ValueError(f"got {len(target_sizes)} target sizes for {len(maps)} anomaly maps")
        results = []
        for index in range(len(maps)):
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
