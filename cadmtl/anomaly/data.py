"""Anomaly-detection (`*_ad`) config splits as samples: the image at its own size, its 0 / 1 / 255 mask, its labels.

Train splits hold normal images only; validation and test hold normal and anomalous ones (see
`dataset_scripts.schema`). Splits are streamed, so a repo rebuilt in place is read as it is now (datasets caches
non-streaming loads of local folders by folder name).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from cadmtl.data.pipeline import IMAGENET_MEAN, IMAGENET_STD, encoded_bytes, load_split
from dataset_scripts.images import to_rgb
from dataset_scripts.schema import AD, GOOD, kind_of_config
from modeling_cadmtl_anomaly.image_processing_cadmtl_anomaly import pixel_values_from_images

NORMAL_PIXEL, ANOMALOUS_PIXEL, IGNORED_PIXEL = 0, 1, 255


@dataclass
class AnomalySample:
    """One image of an `_ad` split: RGB at its stored size, its mask (H, W) uint8 in {0, 1, 255}, its labels."""

    image_id: str
    image: Image.Image
    mask: np.ndarray
    is_normal: bool
    defect_type: str

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the stored image."""
        return self.image.height, self.image.width


def _open(value: Any) -> Image.Image:
    return value if isinstance(value, Image.Image) else Image.open(io.BytesIO(encoded_bytes(value)))


def iter_anomaly_split(repo: str, config: str, split: str) -> Iterator[AnomalySample]:
    """The samples of one split of an `_ad` config, in stored order (streamed: never a stale cache)."""
    if kind_of_config(config) != AD:
        raise ValueError(f"{config!r} is not an anomaly-detection config (its name must end in _ad)")
    dataset = load_split(repo, config, split, streaming=True)
    defect_names = dataset.features["defect_type"].names
    for row in dataset.decode(False) if hasattr(dataset, "decode") else dataset:
        image = to_rgb(_open(row["image"]))
        mask = np.asarray(_open(row["mask"]), dtype=np.uint8)
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"{repo}/{config}/{split}: image {row['image_id']} is {image.width}x{image.height} but its mask is "
                f"{mask.shape[1]}x{mask.shape[0]}"
            )
        defect = row["defect_type"]
        yield AnomalySample(
            image_id=str(row["image_id"]),
            image=image,
            mask=mask,
            is_normal=bool(row["is_normal"]),
            defect_type=defect_names[defect] if isinstance(defect, int) else str(defect),
        )


def load_anomaly_split(repo: str, config: str, split: str, limit: int | None = None) -> list[AnomalySample]:
    """The first `limit` (default all) samples of a split as a list."""
    samples = []
    for sample in iter_anomaly_split(repo, config, split):
        if limit is not None and len(samples) >= limit:
            break
        samples.append(sample)
    if not samples:
        raise ValueError(f"{repo}: split {split!r} of config {config!r} has no images")
    return samples


def normal_only(samples: Sequence[AnomalySample], what: str) -> list[AnomalySample]:
    """The normal samples; anomalous ones in a training split are refused with the first offending id named."""
    anomalous = [sample.image_id for sample in samples if not sample.is_normal or sample.defect_type != GOOD]
    if anomalous:
        raise ValueError(
            f"{what} must hold normal images only, but {len(anomalous)} are anomalous (first: {anomalous[0]}); "
            "rebuild the split with the converter (it excludes and counts them)"
        )
    return list(samples)


def to_pixel_values(
    images: Sequence[Image.Image],
    size: int | tuple[int, int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """(B, 3, H, W) float32: each image resized (bilinear, antialiased) to `size` and normalised, exactly as the
    saved models' `AnomalyImageProcessor` does (this is its implementation)."""
    height, width = (size, size) if isinstance(size, int) else size
    return pixel_values_from_images(images, (height, width), mean, std)
