"""Training-side data pipeline: stream a config split, augment it per task, batch it for the model.

- :func:`load_split` opens one config split of a repo folder or Hub dataset (streaming by default) with
  clear errors for unknown configs, unknown splits and empty splits.
- :class:`TaskTransform` decodes one example and applies the task's ``torchvision.transforms.v2`` pipeline,
  keeping boxes and masks aligned with the image, then normalises it.
- :func:`collate_fn` batches transformed examples into exactly what the model's forward expects.
- :func:`make_dataloader` puts it together for one rank: each rank reads its own shards
  (``datasets.distributed.split_dataset_by_node``; do not also pass the loader to ``accelerator.prepare``),
  DataLoader workers split those shards further, training shuffles and cycles forever, evaluation makes
  one exact pass in which every sample is seen by exactly one rank.

Decoding uses Pillow on the embedded bytes (``Image(decode=False)``): in training, JPEGs are decoded straight at
a reduced scale (``draft``) when the target size allows it, which is much cheaper than decoding full
resolution and resizing, and keeps the boxes exact (they are rescaled with the image). Evaluation decodes at full
resolution and resizes like ``CadMtlImageProcessor`` does, so evaluation and serving see the same pixels.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image, ImageOps
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from cadmtl.tasks import get_cadmtl_task
from dataset_scripts.images import to_rgb
from dataset_scripts.schema import IGNORE_INDEX, task_of_config

try:  # deprecated since torchvision 0.29 in favour of TorchCodec, but still the fastest full-size JPEG decoder
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _decode_jpeg
except ImportError:  # pragma: no cover - a torchvision without image ops: Pillow decodes everything
    _decode_jpeg = None

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EXIF_ORIENTATION = 0x0112
_JPEG_MAGIC = b"\xff\xd8\xff"
_NEAREST = InterpolationMode.NEAREST_EXACT
_GRAY_WEIGHTS = torch.tensor([0.2989, 0.587, 0.114])  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


# ------------------------------------------------------------------------------------------- loading
def load_split(
    path_or_repo: str, config: str, split: str, *, streaming: bool = True
) -> datasets.IterableDataset | datasets.Dataset:
    """One config split of a local repo folder or a Hub dataset repo id (e.g. ``cad-mtl/cad100k``).

    Opened once per process and cached: the trainer opens every split many times (one stream per config, the
    held-out batches, each evaluation), and resolving a repo's card and data files costs seconds. Callers
    derive new datasets from the returned one (``select_columns``, ``shuffle``...) and never mutate it.
    """
    fingerprint = local_fingerprint(path_or_repo, config)
    return _load_split(str(path_or_repo), config, split, streaming, fingerprint)


def local_fingerprint(path_or_repo: str | os.PathLike, config: str) -> str | None:
    """A digest of a local repo's card and its config's Parquet files (path, size, modification time), None for
    a Hub id. It keys the caches, so a repo rebuilt in place is read as it is now: datasets 5.2 caches a
    non-streaming local load by the folder's *name*, whatever the files hold (a/repo and b/repo, or a repo
    rewritten in place, would load the first rows it saw)."""
    folder = Path(path_or_repo)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for path in [folder / "README.md", *sorted((folder / config).rglob("*.parquet"))]:
        if path.exists():
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


@functools.lru_cache(maxsize=256)
def _load_split(
    path_or_repo: str, config: str, split: str, streaming: bool, fingerprint: str | None
) -> datasets.IterableDataset | datasets.Dataset:
    try:
        configs = datasets.get_dataset_config_names(path_or_repo)
    except Exception as error:  # datasets raises many types here (missing folder, offline, no card)
        raise ValueError(f"cannot open dataset {path_or_repo!r}: {type(error).__name__}: {error}") from error
    if config not in configs:
        raise ValueError(f"{path_or_repo}: config {config!r} not found; available configs: {sorted(configs)}")
    splits = datasets.get_dataset_split_names(path_or_repo, config)
    if split not in splits:
        raise ValueError(
            f"{path_or_repo}: config {config!r} has no split {split!r}; available splits: {splits}"
        )
    # A non-streaming local load gets a cache folder of its own content (see `local_fingerprint`).
    cache = (
        {"cache_dir": str(Path(datasets.config.HF_DATASETS_CACHE) / "cadmtl-local" / fingerprint)}
        if fingerprint and not streaming
        else {}
    )
    dataset = datasets.load_dataset(path_or_repo, config, split=split, streaming=streaming, **cache)
    info_split = (dataset.info.splits or {}).get(split) if dataset.info is not None else None
    if info_split is not None and info_split.num_examples is not None:
        empty = info_split.num_examples == 0
    elif streaming:
        try:
            empty = next(iter(dataset.take(1)), None) is None
        except ValueError as error:  # datasets 5.2 fails outright on a Parquet file without rows
            raise ValueError(
                f"{path_or_repo}: split {split!r} of config {config!r} is empty or unreadable: {error}"
            ) from error
    else:
        empty = len(dataset) == 0
    if empty:
        raise ValueError(f"{path_or_repo}: split {split!r} of config {config!r} is empty")
    return dataset


# ------------------------------------------------------------------------------------------- decoding
def encoded_bytes(value: Any) -> bytes | None:
    """The encoded bytes of a datasets image value (bytes, or a {"bytes", "path"} dict); None for a PIL image."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            with open(value["path"], "rb") as handle:
                return handle.read()
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from a JPEG's start-of-frame marker, without decoding (``None`` if not found)."""
    index = 2
    while index + 9 <= len(data):
        if data[index] != 0xFF:
            return None
        marker = data[index + 1]
        if marker == 0xFF:  # fill byte
            index += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
            return int.from_bytes(data[index + 5 : index + 7], "big"), int.from_bytes(
                data[index + 7 : index + 9], "big"
            )
        index += 2 + int.from_bytes(data[index + 2 : index + 4], "big")
    return None


def decode_rgb(value: Any, min_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(uint8 tensor (3, h, w), (H, W) of the stored image)`` from encoded bytes or a PIL image.

    With ``min_size = (height, width)``, a JPEG at least twice that size is decoded by Pillow at the
    smallest 1/2, 1/4 or 1/8 scale still that large (``draft``), which is much cheaper than a full decode;
    other JPEGs go to torchvision's ``decode_jpeg`` (faster than Pillow at full size), everything else
    to Pillow. EXIF orientation is applied, as ``datasets.Image`` does; ``(H, W)`` is the upright size.
    """
    data = encoded_bytes(value)
    if data is not None and data[:3] == _JPEG_MAGIC and _decode_jpeg is not None:
        size = _jpeg_size(data) if min_size is not None else None
        reducible = (
            size is not None and min(size[0] // max(min_size[0], 1), size[1] // max(min_size[1], 1)) >= 2
        )
        if not reducible:
            try:
                with warnings.catch_warnings():
                    # torchvision's deprecation notice, and torch's notice about the read-only bytes buffer.
                    warnings.simplefilter("ignore")
                    pixels = _decode_jpeg(
                        torch.frombuffer(data, dtype=torch.uint8),
                        mode=ImageReadMode.RGB,
                        apply_exif_orientation=True,
                    )
                return pixels, (pixels.shape[1], pixels.shape[2])
            except RuntimeError:
                pass  # a JPEG variant torchvision's libjpeg rejects: Pillow below handles it
    image = Image.open(io.BytesIO(data)) if data is not None else value  # reads the header only
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"expected image bytes, a {{'bytes', 'path'}} dict or a PIL image, got {type(value).__name__}"
        )
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1) if "exif" in image.info else 1
    stored_size = (image.height, image.width) if orientation < 5 else (image.width, image.height)
    if min_size is not None and image.format == "JPEG":
        image.draft("RGB", (min_size[1], min_size[0]) if orientation < 5 else min_size)
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    return torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1), stored_size


def decode_mask(value: Any) -> torch.Tensor:
    """``uint8`` tensor ``(H, W)`` of class ids from a single-channel mask PNG."""
    data = encoded_bytes(value)
    image = Image.open(io.BytesIO(data)) if data is not None else value
    if image.mode not in ("L", "P"):
        raise ValueError(f"segmentation masks must be single-channel (L) PNGs, got mode {image.mode}")
    return torch.from_numpy(np.array(image, dtype=np.uint8))


# ------------------------------------------------------------------------------------------- geometry
def _as_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = (int(v) for v in image_size)
    return (height, width)


def random_resized_crop_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """``(top, left, crop_height, crop_width)`` drawn like ``v2.RandomResizedCrop``."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = round((target_area * aspect) ** 0.5)
        crop_h = round((target_area / aspect) ** 0.5)
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return rng.randint(0, height - crop_h), rng.randint(0, width - crop_w), crop_h, crop_w
    # Fallback: the largest centred crop within the ratio range.
    aspect = width / height
    if aspect < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        crop_h, crop_w = height, round(height * ratio[1])
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


class TaskTransform:
    """Decode + augment + normalise one example of a ``cls``, ``det`` or ``seg`` config.

    Returns ``{"pixel_values": float (3, H, W), "labels": ..., "image_id": str, "orig_size": (h, w)}``
    where ``(H, W) = image_size`` and ``orig_size`` is the stored image's size. ``labels`` is a 0-d long
    tensor (cls), ``{"class_labels": (n,), "boxes": (n, 4) cxcywh normalised to (H, W)}`` (det) or a
    ``(H, W)`` long mask with 255 = ignore (seg).

    ``train=True``: cls = RandomResizedCrop + horizontal flip + light colour jitter; det = scale jitter
    (resize to ``image_size`` x U(``det_scale_range``)), random crop or pad back to ``image_size`` (padding
    is black, 255 in masks), flip, then boxes clamped and sanitised (sides < 1 px dropped, like
    ``SanitizeBoundingBoxes``); seg = RandomResizedCrop + flip on image and mask (mask nearest-exact).
    Crop aspect ratios are drawn relative to the image's own aspect, so train crops are distorted like
    the eval resize. ``train=False``: the whole image is resized to ``image_size`` (no crop), so
    predictions map back to the original image exactly. ``label_map`` maps dataset class ids to model ids.

    The operations are ``torchvision.transforms.v2.functional`` kernels on plain tensors with the random
    parameters drawn here: the per-sample dispatch of the v2 transform classes cost more than the kernels
    themselves (1.1 of 1.7 ms for detection at 224 px), and the pipeline must reach 500 img/s per worker.
    """

    def __init__(
        self,
        task: str,
        image_size: int | tuple[int, int],
        train: bool,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        label_map: Mapping[int, int] | None = None,
        *,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        det_scale_range: tuple[float, float] = (0.75, 1.25),
        hflip: float = 0.5,
        color_jitter: float = 0.2,
    ) -> None:
        self.definition = get_cadmtl_task(task)
        self.task, self.train = task, train
        self.size = _as_size(image_size)
        self.crop_scale, self.crop_ratio, self.det_scale_range = crop_scale, crop_ratio, det_scale_range
        self.hflip, self.color_jitter = hflip, color_jitter
        self.label_map = dict(label_map) if label_map is not None else None
        std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)
        mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
        # (x / 255 - mean) / std as one multiply and one subtract.
        self._scale, self._shift = 1.0 / (255.0 * std), mean / std
        self._low, self._high = -self._shift, 255.0 * self._scale - self._shift
        self._lut = None  # the mask id lookup of `label_map`, built on the first mask
        # Training decodes JPEGs at a reduced scale (no smaller than the augmentation can need, so no detail is
        # lost). Evaluation decodes at full size, as the image processor (`CadMtlImageProcessor`) does when the
        # model is served: the two then feed the model the same pixels and report the same metrics.
        enlarge = (
            det_scale_range[1] if self.definition.scale_jitter else 1.0 / max(crop_scale[0], 1e-3) ** 0.5
        )
        self._decode_size = (round(self.size[0] * enlarge), round(self.size[1] * enlarge)) if train else None

    # ----------------------------------------------------------------------------------- label maps
    def _map_id(self, class_id: int) -> int:
        if self.label_map is None:
            return int(class_id)
        try:
            return self.label_map[int(class_id)]
        except KeyError:
            raise ValueError(
                f"dataset class id {int(class_id)} is not in label_map (it maps ids {sorted(self.label_map)}); "
                "build the map over every class name of the config"
            ) from None

    def _mask_lut(self) -> torch.Tensor:
        lut = torch.full((256,), -1, dtype=torch.long)
        for source, target in self.label_map.items():
            if not 0 <= int(source) < IGNORE_INDEX:
                raise ValueError(f"label_map key {source} is not a mask class id (0..254)")
            lut[int(source)] = int(target)
        lut[IGNORE_INDEX] = IGNORE_INDEX
        return lut

    def _map_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if self.label_map is None:
            return mask.long()
        if self._lut is None:
            self._lut = self._mask_lut()
        mapped = self._lut[mask.long()]
        if (mapped < 0).any():
            unknown = sorted(int(v) for v in torch.unique(mask[mapped < 0]))
            raise ValueError(
                f"mask class ids {unknown} are not in label_map (it maps ids {sorted(self.label_map)})"
            )
        return mapped

    # ----------------------------------------------------------------------------------- geometry
    def _flip(self, rng: random.Random) -> bool:
        return self.hflip > 0 and rng.random() < self.hflip

    def _crop_and_resize(
        self, image: torch.Tensor, mask: torch.Tensor | None = None, rng: random.Random | None = None
    ):
        """cls / seg: RandomResizedCrop + flip (train) or a plain resize (eval), mask nearest-exact."""
        size = list(self.size)
        if not self.train:
            image = F.resize(image, size, antialias=True)
            if mask is not None:
                mask = F.resize(mask[None], size, interpolation=_NEAREST)[0]
            return image, mask
        height, width = image.shape[-2:]
        # Ratios relative to the image's own aspect: the crop is then distorted like the eval resize.
        relative = (width / height) / (self.size[1] / self.size[0])
        ratio = (self.crop_ratio[0] * relative, self.crop_ratio[1] * relative)
        top, left, crop_h, crop_w = random_resized_crop_params(height, width, self.crop_scale, ratio, rng)
        image = F.resized_crop(image, top, left, crop_h, crop_w, size, antialias=True)
        if mask is not None:
            mask = F.resized_crop(mask[None], top, left, crop_h, crop_w, size, interpolation=_NEAREST)[0]
        if self._flip(rng):
            image = image.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        return image, mask

    def _scale_crop_pad(
        self, image: torch.Tensor, boxes: torch.Tensor, rng: random.Random | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """det: resize (with scale jitter when training), crop or pad to size, flip; boxes are xyxy px."""
        height, width = image.shape[-2:]
        out_h, out_w = self.size
        scale = rng.uniform(*self.det_scale_range) if self.train else 1.0
        new_h, new_w = max(1, round(out_h * scale)), max(1, round(out_w * scale))
        image = F.resize(image, [new_h, new_w], antialias=True)
        boxes = boxes * torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height])
        if (new_h, new_w) != (out_h, out_w):
            canvas = image.new_zeros((image.shape[0], out_h, out_w))
            offsets = []
            spans = []
            for new, out in ((new_h, out_h), (new_w, out_w)):
                offset = rng.randint(0, abs(new - out))
                # Larger than the output: crop from `offset`; smaller: paste at `offset`.
                src, dst = (
                    (slice(offset, offset + out), slice(0, out))
                    if new >= out
                    else (slice(0, new), slice(offset, offset + new))
                )
                spans.append((src, dst))
                offsets.append(-offset if new >= out else offset)
            (src_y, dst_y), (src_x, dst_x) = spans
            canvas[:, dst_y, dst_x] = image[:, src_y, src_x]
            image = canvas
            boxes = boxes + torch.tensor([offsets[1], offsets[0], offsets[1], offsets[0]], dtype=boxes.dtype)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, out_w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, out_h)
        if self.train and self._flip(rng):
            image = image.flip(-1)
            boxes = torch.stack([out_w - boxes[:, 2], boxes[:, 1], out_w - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, boxes

    def eval_pixels(self, image: torch.Tensor) -> torch.Tensor:
        """The evaluation input of a decoded uint8 image (3, H, W), labels aside: the whole image resized to
        ``image_size`` and normalised. Every task's evaluation transform feeds the model exactly this (detection's
        resize at scale 1 is the same resize), so one decoded image serves every head of that size."""
        if self.train:
            raise ValueError(
                "eval_pixels is the evaluation transform: build the TaskTransform with train=False"
            )
        pixels, _ = self._crop_and_resize(image)
        return self._normalise(pixels)

    # ----------------------------------------------------------------------------------- call
    def _normalise(self, image: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        """uint8 (3, H, W) -> normalised float; with ``rng``, brightness / contrast / saturation jitter too.

        The jitter (``ColorJitter`` semantics, one clamp at the end) and the normalisation are one affine
        colour map: saturation mixes each channel with the gray level (a 3 x 3 matrix), contrast and
        brightness scale around the mean gray level. Applied as a single matrix product, it costs about a
        third of ``v2.ColorJitter`` followed by ``Normalize``.
        """
        pixels = image.to(torch.float32)
        if rng is None:
            return pixels.mul_(self._scale).sub_(self._shift)
        strength = self.color_jitter
        brightness, contrast, saturation = (1.0 + strength * rng.uniform(-1.0, 1.0) for _ in range(3))
        gray_mean = float(_GRAY_WEIGHTS @ pixels.mean(dim=(1, 2)))  # saturation keeps the gray level
        mix = saturation * torch.eye(3) + (1.0 - saturation) * _GRAY_WEIGHTS.expand(3, 3)
        scale = self._scale.view(3, 1)
        matrix = scale * (contrast * brightness) * mix
        offset = scale * ((1.0 - contrast) * brightness * gray_mean) - self._shift.view(3, 1)
        out = torch.addmm(offset, matrix, pixels.view(3, -1)).view_as(pixels)
        return out.clamp_(self._low, self._high)  # the 0..255 clamp, in normalised units

    def __call__(
        self, example: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Transform one example; random draws come from ``generator`` (the global torch RNG if ``None``)."""
        # One draw from torch seeds a Python RNG: its draws cost nanoseconds, a torch tensor op microseconds.
        rng = random.Random(int(torch.randint(0, 2**62, (), generator=generator))) if self.train else None
        image, orig_size = decode_rgb(example["image"], self._decode_size)
        # the task's own decoding and augmentation (`CadMtlTask.sample`)
        pixels, label = getattr(self, self.definition.sample)(example, image, orig_size, rng)
        jitter = self.train and self.definition.color_jitter and self.color_jitter > 0
        return {
            "pixel_values": self._normalise(pixels, rng if jitter else None),
            "labels": label,
            "image_id": example.get("image_id", ""),
            "orig_size": orig_size,
        }

    def classification_sample(
        self,
        example: Mapping[str, Any],
        image: torch.Tensor,
        orig_size: tuple[int, int],
        rng: random.Random | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cls: the class id (0-d long tensor) of a random resized crop (train) or the resized image (eval)."""
        pixels, _ = self._crop_and_resize(image, rng=rng)
        return pixels, torch.tensor(self._map_id(example["label"]), dtype=torch.long)

    def segmentation_sample(
        self,
        example: Mapping[str, Any],
        image: torch.Tensor,
        orig_size: tuple[int, int],
        rng: random.Random | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """seg: the (H, W) long mask (255 = ignore) cropped and resized with the image, nearest-exact."""
        mask = decode_mask(example["mask"])
        if tuple(mask.shape) != orig_size:
            raise ValueError(
                f"{example.get('image_id')}: mask {tuple(mask.shape)} differs from image {orig_size}"
            )
        if tuple(mask.shape) != tuple(image.shape[-2:]):  # the image was decoded at a reduced scale
            mask = F.resize(mask[None], list(image.shape[-2:]), interpolation=_NEAREST)[0]
        pixels, mask = self._crop_and_resize(image, mask, rng)
        return pixels, self._map_mask(mask)  # after resizing: the id lookup runs on the small mask

    def detection_sample(
        self,
        example: Mapping[str, Any],
        image: torch.Tensor,
        orig_size: tuple[int, int],
        rng: random.Random | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """det: `{"class_labels": (n,), "boxes": (n, 4) cxcywh normalised}` of the scale-jittered, cropped or
        padded and flipped image (train; boxes under 1 px dropped) or of the resized image (eval)."""
        objects = example.get("objects") or {}
        xywh = torch.as_tensor(objects.get("bbox") or [], dtype=torch.float32).reshape(-1, 4)
        classes = torch.tensor([self._map_id(c) for c in objects.get("category") or []], dtype=torch.long)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        height, width = image.shape[-2:]
        if (height, width) != orig_size:  # reduced-scale decoding: the boxes shrink with the image
            boxes = boxes * torch.tensor([width / orig_size[1], height / orig_size[0]] * 2)
        pixels, boxes = self._scale_crop_pad(image, boxes, rng)
        if self.train:  # evaluation keeps every ground-truth box, however small it became
            keep = ((boxes[:, 2] - boxes[:, 0]) >= 1.0) & ((boxes[:, 3] - boxes[:, 1]) >= 1.0)
            boxes, classes = boxes[keep], classes[keep]
        out_h, out_w = self.size
        cxcywh = torch.stack(
            [
                (boxes[:, 0] + boxes[:, 2]) / (2 * out_w),
                (boxes[:, 1] + boxes[:, 3]) / (2 * out_h),
                (boxes[:, 2] - boxes[:, 0]) / out_w,
                (boxes[:, 3] - boxes[:, 1]) / out_h,
            ],
            dim=1,
        )
        return pixels, {"class_labels": classes, "boxes": cxcywh}


# ------------------------------------------------------------------------------------------- batching
def collate_fn(task: str) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """A collate function for ``task`` batching :class:`TaskTransform` outputs into
    ``{"pixel_values": (B, 3, H, W), "labels": ..., "image_ids": [str], "orig_sizes": LongTensor (B, 2)}``;
    labels are a LongTensor (B,) for cls, a list of B dicts for det, a LongTensor (B, H, W) for seg."""
    stack = get_cadmtl_task(task).stack_labels

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        labels = [item["labels"] for item in batch]
        return {
            "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
            "labels": torch.stack(labels) if stack else labels,
            "image_ids": [item["image_id"] for item in batch],
            "orig_sizes": torch.tensor([item["orig_size"] for item in batch], dtype=torch.long),
        }

    return collate


class TransformedStream(torch.utils.data.IterableDataset):
    """Applies a transform to a streamed ``datasets.IterableDataset``; with ``infinite`` it starts a new
    epoch (``set_epoch``, so the shuffle changes) whenever the stream ends. Runs inside each DataLoader
    worker, where ``datasets`` hands every worker its own shards.

    Reproducible and resumable: the random augmentation of the n-th example a worker produces is seeded by
    ``(seed, worker, n)`` alone, not by the global RNG (which the model and other streams also draw from). So
    ``skip_batches`` can fast-forward a stream after a resume by skipping raw rows, without decoding them, and
    the batches that follow are exactly those an uninterrupted run would have seen.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        transform: Callable,
        infinite: bool,
        *,
        seed: int = 0,
        batch_size: int = 1,
        skip_batches: int = 0,
    ) -> None:
        super().__init__()
        self.dataset, self.transform, self.infinite = dataset, transform, infinite
        self.seed, self.batch_size, self.skip_batches = seed, batch_size, skip_batches

    def _examples_to_skip(self, worker: int, num_workers: int) -> int:
        # A DataLoader takes batches from its workers in turn: worker w made batches w, w + W, w + 2W, ...
        batches = max(0, (self.skip_batches - worker + num_workers - 1) // num_workers)
        return batches * self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        to_skip = self._examples_to_skip(worker, num_workers)
        generator_seed = (self.seed * 1_000_003 + worker) * 1_000_003
        generator = torch.Generator()
        index, epoch = 0, 0
        while True:
            self.dataset.set_epoch(epoch)
            produced = 0
            for example in self.dataset:
                produced += 1
                index += 1
                if index <= to_skip:
                    continue
                # A private generator: torch.manual_seed would also seed every accelerator backend, which
                # costs about 1 ms per call on a machine without one.
                generator.manual_seed(generator_seed + index)
                transformed = self.transform(example, generator)
                yield transformed
            epoch += 1
            if not self.infinite or produced == 0:  # a worker without shards must not spin forever
                return


def make_dataloader(
    path_or_repo: str,
    config: str,
    split: str,
    task: str,
    *,
    batch_size: int,
    image_size: int | tuple[int, int],
    train: bool,
    label_map: Mapping[int, int] | None = None,
    num_workers: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
    interleave_shards: int = 1,
    infinite: bool | None = None,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    pin_memory: bool = False,
    skip_batches: int = 0,
) -> DataLoader:
    """A DataLoader over this rank's part of ``config``/``split`` (streamed), batched for ``task``.

    Train: shards shuffled with ``seed`` plus a ``shuffle_buffer`` of examples, a new order each epoch,
    cycling forever (``infinite`` defaults to ``train``). The buffer reads one shard at a time by default:
    the dataset builder writes rows in random order, so shards need no interleaving, and datasets 5.2
    pauses 5 s whenever an interleaved pass ends (``interleave_shards > 1`` mixes that many shards in the
    buffer, for third-party datasets whose shards are sorted). Eval: one pass, ``drop_last=False``; the ranks'
    samples are disjoint and together cover the split. Keep ``n_shards`` a multiple of
    ``world_size * num_workers`` for balanced reading (the demo's train splits have 4 shards).
    ``skip_batches`` resumes a stream after that many batches (raw rows are skipped, not decoded); the
    augmentation is seeded per example, so the resumed stream is identical to an uninterrupted one.
    """
    if task_of_config(config) != task:
        raise ValueError(f"config {config!r} is a {task_of_config(config)} config, not {task}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    dataset = load_split(path_or_repo, config, split, streaming=True)
    definition = get_cadmtl_task(task)
    keep = ["image", "image_id", *definition.label_columns]
    missing = [c for c in keep if c not in (dataset.features or {})]
    if missing:
        raise ValueError(f"{path_or_repo} {config}/{split} lacks the columns {missing} a {task} config needs")
    dataset = dataset.select_columns(keep).cast_column("image", datasets.Image(decode=False))
    for column in definition.encoded_image_columns:
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    if train:
        dataset = dataset.shuffle(
            seed=seed, buffer_size=shuffle_buffer, max_buffer_input_shards=interleave_shards
        )
    if world_size > 1:
        if dataset.num_shards % world_size:
            logger.warning(
                "%s/%s has %d shards for %d ranks: every rank reads all shards and keeps 1 row in %d (slower, "
                "and ranks may get different counts)",
                config,
                split,
                dataset.num_shards,
                world_size,
                world_size,
            )
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    transform = TaskTransform(task, image_size, train, image_mean, image_std, label_map)
    stream = TransformedStream(
        dataset,
        transform,
        infinite=train if infinite is None else infinite,
        seed=seed * 100_003 + rank,  # distinct augmentation per rank
        batch_size=batch_size,
        skip_batches=skip_batches,
    )
    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn(task),
        drop_last=False,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
