"""Image processor of CadMtl: resize, normalise and (optionally) pad images, carrying detection boxes and
segmentation masks along, plus the post-processing of each head's outputs into the formats pipelines expect."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF
from PIL import Image
from torch.nn import functional as F
from torchvision.ops import batched_nms, box_convert
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
)
from transformers.processing_utils import ImagesKwargs

from .configuration_cadmtl import IGNORE_INDEX, VERDICT_SOURCES
from .tasks_cadmtl import PIPELINE_TASKS, TASK_DEFINITIONS, TASKS, get_task, head_outputs, output_field

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


def _pil_to_rgb(images: Any) -> Any:
    """PIL inputs (one or a list) converted by `to_rgb`; arrays and tensors are left to the backend."""
    if isinstance(images, Image.Image):
        return to_rgb(images)
    if isinstance(images, (list, tuple)):
        return [to_rgb(image) if isinstance(image, Image.Image) else image for image in images]
    return images


def _output_tensors(outputs: Any) -> list[torch.Tensor]:
    values = outputs.values() if hasattr(outputs, "values") else vars(outputs).values()
    return [value for value in values if isinstance(value, torch.Tensor)]


def _as_size_list(target_sizes: Any, batch_size: int) -> list[tuple[int, int]] | None:
    if target_sizes is None:
        return None
    sizes = target_sizes.tolist() if isinstance(target_sizes, torch.Tensor) else list(target_sizes)
    if len(sizes) != batch_size:
        raise ValueError(f"Got {len(sizes)} target sizes for a batch of {batch_size} predictions.")
    return [(int(h), int(w)) for h, w in sizes]


# ------------------------------------------------------------------------------------------------------- tiles
# High-resolution inspection by tiles: pure helpers, a copy of those in
# `modeling_cadmtl_anomaly.features_cadmtl_anomaly` (the two Hub packages may not import each other;
# tests/model/test_tiles.py keeps them equal).
MIN_TILE_SIZE = 32


def check_tile_settings(tile_size: int | None, tile_overlap: int | None) -> None:
    """One-line `ValueError` naming the option for a tile size that is not an integer >= `MIN_TILE_SIZE`, or an
    overlap that is negative or not below the tile size."""
    if tile_size is None:
        if tile_overlap:
            raise ValueError(f"--tile-overlap (tile_overlap={tile_overlap}) needs --tile-size (tile_size)")
        return
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < MIN_TILE_SIZE:
        raise ValueError(
            f"--tile-size (tile_size) must be an integer of at least {MIN_TILE_SIZE} pixels, got {tile_size!r}"
        )
    overlap = 0 if tile_overlap is None else tile_overlap
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile_size:
        raise ValueError(
            f"--tile-overlap (tile_overlap) must be an integer from 0 to tile_size - 1 = {tile_size - 1} pixels, "
            f"got {tile_overlap!r}"
        )


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:  # a side shorter than a tile: one tile spans it (no padding)
        return [0]
    starts = list(range(0, length - tile, stride))
    return [
        *starts,
        length - tile,
    ]  # the last tile ends at the edge (shifted back, overlapping its neighbour more)


def tile_boxes(height: int, width: int, tile_size: int, overlap: int = 0) -> list[tuple[int, int, int, int]]:
    """The tiles covering a `height` x `width` image, row by row: `(x0, y0, x1, y1)` pixel boxes (x1, y1
    exclusive) of a regular grid with stride `tile_size - overlap`, the last row / column shifted to end at the
    image's edge. A side shorter than `tile_size` is covered by one tile spanning that side, so an image smaller
    than a tile is one tile: the whole image, exactly as without tiles (never padded)."""
    check_tile_settings(tile_size, overlap)
    stride = tile_size - overlap
    rows = _tile_starts(height, tile_size, stride)
    columns = _tile_starts(width, tile_size, stride)
    tile_height, tile_width = min(tile_size, height), min(tile_size, width)
    return [(x0, y0, x0 + tile_width, y0 + tile_height) for y0 in rows for x0 in columns]


def tile_canvas(
    boxes: Sequence[tuple[int, int, int, int]], height: int, width: int, input_size: tuple[int, int]
) -> tuple[list[tuple[int, int, int, int]], tuple[int, int]]:
    """Where the model's outputs of the tiles `boxes` (all of one size, each resized to `input_size` = (h, w) on
    the way in) lie on a canvas covering the whole `height` x `width` image at the model's resolution: (the boxes
    on the canvas, each exactly `input_size`, and the canvas size). Stitching there needs no resampling per tile;
    the canvas is resized to the image size once, like an untiled output. Offsets are rounded half up, so the last
    row / column ends exactly at the canvas edge."""
    tile_width, tile_height = boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1]
    scale_y, scale_x = input_size[0] / tile_height, input_size[1] / tile_width
    canvas = (math.floor(height * scale_y + 0.5), math.floor(width * scale_x + 0.5))
    placed = []
    for x0, y0, _, _ in boxes:
        top = min(math.floor(y0 * scale_y + 0.5), canvas[0] - input_size[0])
        left = min(math.floor(x0 * scale_x + 0.5), canvas[1] - input_size[1])
        placed.append((left, top, left + input_size[1], top + input_size[0]))
    return placed, canvas


def stitch(
    maps: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], size: tuple[int, int]
) -> torch.Tensor:
    """Tile outputs `maps` (N, [C,] h, w) put back at their `boxes` (x0, y0, x1, y1) on a `size` = (H, W) canvas,
    overlaps averaged: (C, H, W) or (H, W). A map whose size differs from its box is resized (bilinear) to it; a
    canvas pixel no box covers is 0."""
    if len(maps) != len(boxes):
        raise ValueError(f"stitch: got {len(maps)} maps for {len(boxes)} boxes")
    squeeze = maps.ndim == 3
    maps = maps[:, None] if squeeze else maps
    total = maps.new_zeros((maps.shape[1], *size), dtype=torch.float32)
    count = maps.new_zeros(size, dtype=torch.float32)
    for tile, (x0, y0, x1, y1) in zip(maps.float(), boxes):
        if tuple(tile.shape[-2:]) != (y1 - y0, x1 - x0):
            tile = F.interpolate(tile[None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
        total[:, y0:y1, x0:x1] += tile
        count[y0:y1, x0:x1] += 1
    stitched = total / count.clamp(min=1)
    return stitched[0] if squeeze else stitched


class CadMtlImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    task_sizes (`dict[str, int]`, *optional*):
        The square input size of each task's head, e.g. `{"cls": 224, "det": 512, "seg": 512}` (what the model
        was trained at); a task without an entry uses `size`.
    task (`str`, *optional*):
        "cls", "det" or "seg": preprocess at that task's size from `task_sizes`. An explicit `size` wins.
    tile_size (`int`, *optional*):
        High-resolution inspection: the detection and segmentation heads see overlapping square tiles of this
        many pixels of the original image (see `predict`); None: the whole image.
    tile_overlap (`int`, *optional*, defaults to 0):
        Pixels shared by neighbouring tiles (below `tile_size`).
    tile_batch_size (`int`, *optional*, defaults to 8):
        Tiles per forward pass.
    """

    task_sizes: dict[str, int] | None
    task: str | None
    tile_size: int | None
    tile_overlap: int
    tile_batch_size: int


class CadMtlImageProcessor(TorchvisionBackend):
    r"""
    Prepares images for [`CadMtlModel`] and turns its outputs into predictions.

    Images are converted to RGB (grayscale, RGBA, CMYK are accepted), resized to `size` (default 512x512, the
    whole image: no crop, so predictions map back exactly), rescaled to [0, 1] and normalised with the ImageNet
    statistics DINOv3 was trained with. With `do_pad=True` and an aspect-preserving `size` such as
    `{"shortest_edge": 512}`, a batch is padded at the bottom / right and `pixel_mask` marks the real pixels.

    Each head may have been trained at its own size: `task_sizes` (e.g. `{"cls": 224, "det": 512, "seg": 512}`,
    written by the trainer) records them and `processor(images, task="cls")` resizes to that task's size. A
    processor loaded by `pipeline("image-classification" | "object-detection" | "image-segmentation", ...)` sets
    `task` to the pipeline's task, so each pipeline feeds its head at the size it was trained at; with a processor
    instance of your own, load it with `CadMtlImageProcessor.from_pretrained(repo, task="cls")`.

    Detection annotations (COCO style, per image `{"image_id": ..., "annotations": [{"bbox": [x, y, w, h],
    "category_id": c}, ...]}` in original-image pixels) become `labels`: `{"class_labels", "boxes"}` with
    normalised (cx, cy, w, h) boxes; segmentation maps (class id per pixel) become `labels` `(B, H, W)` resized
    with nearest-neighbour, padding filled with `ignore_index`.
    """

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 512, "width": 512}
    default_to_square = True
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_pad = False
    model_input_names = ["pixel_values", "pixel_mask"]
    ignore_index = IGNORE_INDEX
    task_sizes = None
    task = None
    tile_size = None
    tile_overlap = 0
    tile_batch_size = 8
    valid_kwargs = CadMtlImageProcessorKwargs

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_tile_settings(self.tile_size, self.tile_overlap)
        self.tile_overlap = self.tile_overlap or 0
        if not isinstance(self.tile_batch_size, int) or self.tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be a positive integer, got {self.tile_batch_size!r}.")
        if self.task_sizes is not None:
            unknown = set(self.task_sizes) - set(TASKS)
            if unknown:
                raise ValueError(f"task_sizes has unknown tasks {sorted(unknown)}; expected keys in {TASKS}.")
            bad = {
                task: size
                for task, size in self.task_sizes.items()
                if not isinstance(size, int) or isinstance(size, bool) or size < 1
            }
            if bad:
                raise ValueError(f"task_sizes must map tasks to positive integer sizes (pixels), got {bad}.")
            self.task_sizes = dict(self.task_sizes)
        self._check_task(self.task)

    def set_tiles(self, tile_size: int | None = None, tile_overlap: int | None = None) -> None:
        """Override the saved tile settings (`--tile-size` / `--tile-overlap`, `CADMTL_TILE_SIZE` /
        `CADMTL_TILE_OVERLAP`): a given `tile_size` without an overlap means overlap 0; `tile_overlap` alone
        changes the saved tiles' overlap. A one-line `ValueError` naming the option for bad settings."""
        if tile_size is None and tile_overlap is None:
            return
        if tile_size is None:
            tile_size = self.tile_size
        elif tile_overlap is None:
            tile_overlap = 0
        check_tile_settings(tile_size, tile_overlap)
        self.tile_size, self.tile_overlap = tile_size, tile_overlap or 0

    @staticmethod
    def _check_task(task: str | None) -> None:
        if task is not None and task not in TASKS:
            raise ValueError(f"Unknown task {task!r}; expected one of {TASKS} or None.")

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs: Any) -> Any:
        """`ImageProcessingMixin.from_dict`; when a transformers pipeline of one of the heads loads it (it passes
        `_from_pipeline=<pipeline task>`), `task` is set to that head so it gets its own input size.

        Every loading route ends here, `AutoImageProcessor` included, and so does the class transformers imports
        from the repo's own files with `trust_remote_code=True` (the way every Hub user loads it)."""
        pipeline_task = PIPELINE_TASKS.get(kwargs.pop("_from_pipeline", None))
        loaded = super().from_dict(image_processor_dict, **kwargs)
        return cls._set_pipeline_task(loaded, pipeline_task)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """`ImageProcessingMixin.from_pretrained`, keeping the `_from_pipeline` hint (see `from_dict`), which
        transformers drops before it calls `from_dict`."""
        pipeline_task = PIPELINE_TASKS.get(kwargs.get("_from_pipeline"))
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return cls._set_pipeline_task(loaded, pipeline_task)

    @staticmethod
    def _set_pipeline_task(loaded: Any, pipeline_task: str | None) -> Any:
        processor = loaded[0] if isinstance(loaded, tuple) else loaded
        if pipeline_task is not None and processor.task is None:  # an explicit `task=` wins
            processor.task = pipeline_task
        return loaded

    def size_for(self, task: str | None = None) -> dict[str, int]:
        """The size `preprocess(..., task=task)` resizes to: `task_sizes[task]` (square), else `size`; `task`
        defaults to the processor's own `task`."""
        task = self.task if task is None else task
        self._check_task(task)
        if task is not None and self.task_sizes and task in self.task_sizes:
            return {"height": self.task_sizes[task], "width": self.task_sizes[task]}
        return {key: value for key, value in dict(self.size).items() if value is not None}

    # ------------------------------------------------------------------------------- the one inference path
    # Every consumer of several heads (`cadmtl predict`, the inspection pipeline, the ONNX predictor, evaluation,
    # the verdict's calibration) runs them through `size_groups` -> `preprocess_size_groups` ->
    # `forward_size_groups` (or `predict`, the three at once), so a served prediction is what evaluation scored.
    def size_groups(self, tasks: Sequence[str]) -> list[tuple[dict[str, int], tuple[str, ...]]]:
        """`tasks` grouped by the input size `size_for` gives each, in order: one forward pass per distinct size
        serves all the heads of that size."""
        groups: dict[tuple, list[str]] = {}
        for task in tasks:
            groups.setdefault(tuple(sorted(self.size_for(task).items())), []).append(task)
        return [(dict(size), tuple(group)) for size, group in groups.items()]

    def preprocess_size_groups(self, images: Any, tasks: Sequence[str], **kwargs: Any) -> list[BatchFeature]:
        """`images` preprocessed once per group of `size_groups(tasks)`, in the groups' order: one `BatchFeature`
        with `pixel_values` (and `pixel_mask` where an aspect-preserving `size` pads the batch) per group."""
        batches = []
        for size, group in self.size_groups(tasks):
            fixed = size.get("height") is not None and size.get("width") is not None
            settings = {"return_tensors": "pt", **({} if fixed else {"do_pad": True}), **kwargs, "size": size}
            tiled = [task for task in group if get_task(task).tile_merge is not None]
            if self.tile_size is None or not tiled:
                batches.append(self(images, **settings))
                continue
            whole = len(tiled) < len(group)  # a head of the whole picture (cls) shares this size
            batch = self(images, **settings) if whole else BatchFeature()
            batch.update(self.preprocess_tiles(images, size, **kwargs))
            batches.append(batch)
        return batches

    def preprocess_tiles(self, images: Any, size: dict[str, int], **kwargs: Any) -> BatchFeature:
        """`images` cut into the processor's overlapping tiles (`tile_boxes(height, width, tile_size,
        tile_overlap)`), to be preprocessed at the square input `size` (an aspect-preserving size uses its
        `shortest_edge` as the side) `tile_batch_size` at a time by `forward_size_groups`, so that the tiles of
        large photos never sit in memory as float pixels all at once. Returns a `BatchFeature` with `tiles` (the
        crops, (3, h, w) views of the RGB images, image after image, row by row), `tile_settings` (the keyword
        arguments that preprocess them), `tile_boxes` (N, 4) (x0, y0, x1, y1) in the image's pixels,
        `tile_image_index` (N,) and `image_sizes` (B, 2) (height, width)."""
        side = size.get("height"), size.get("width")
        if None in side:
            edge = size.get("shortest_edge") or max(value for value in size.values() if value)
            side = (edge, edge)
        tensors = self._prepare_image_like_inputs(
            images=_pil_to_rgb(images), do_convert_rgb=True, input_data_format=kwargs.get("input_data_format")
        )
        crops, boxes, owners, sizes = [], [], [], []
        for index, image in enumerate(tensors):
            height, width = (int(value) for value in image.shape[-2:])
            sizes.append((height, width))
            for x0, y0, x1, y1 in tile_boxes(height, width, self.tile_size, self.tile_overlap):
                crops.append(image[:, y0:y1, x0:x1])
                boxes.append((x0, y0, x1, y1))
                owners.append(index)
        settings = {
            **kwargs,
            "return_tensors": "pt",
            "do_pad": False,
            "input_data_format": ChannelDimension.FIRST,
            "size": {"height": side[0], "width": side[1]},
        }
        return BatchFeature(
            {
                "tiles": crops,
                "tile_settings": settings,
                "tile_boxes": torch.tensor(boxes, dtype=torch.int64),
                "tile_image_index": torch.tensor(owners, dtype=torch.int64),
                "image_sizes": torch.tensor(sizes, dtype=torch.int64),
            }
        )

    def forward_size_groups(
        self,
        model: Any,
        inputs: Sequence[Any],
        tasks: Sequence[str],
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run `model` once per group of `size_groups(tasks)` on that group's `inputs` (a mapping with
        `pixel_values` and optionally `pixel_mask`, e.g. from `preprocess_size_groups`) and merge the heads' outputs.

        `model` is anything called like [`CadMtlModel`], `model(pixel_values, task=..., pixel_mask=...)` returning
        the output fields: the model, a DDP / FSDP wrapper of it, the ONNX predictor. A group of one head runs only
        that head; a group of several runs every head and keeps the group's. Inputs are moved to `device` / `dtype`
        (default: the model's `device` / `dtype` where it has them).

        Returns `{field: float32 tensor}` with the output fields (`tasks_cadmtl.TaskDefinition.output_fields`) of
        every head of `tasks`, and `<task>_pixel_mask` for each head whose input was padded.
        """
        groups = self.size_groups(tasks)
        if len(inputs) != len(groups):
            raise ValueError(
                f"Got {len(inputs)} inputs for {len(groups)} input-size groups {[group for _, group in groups]}."
            )
        device = getattr(model, "device", None) if device is None else device
        dtype = getattr(model, "dtype", None) if dtype is None else dtype
        outputs: dict[str, torch.Tensor] = {}
        for group_inputs, (_, group) in zip(inputs, groups):
            if "tiles" in group_inputs:
                outputs.update(self._forward_tiles(model, group_inputs, group, device, dtype))
                continue
            pixel_values = group_inputs["pixel_values"].to(device=device, dtype=dtype)
            pixel_mask = group_inputs.get("pixel_mask")
            extra = {} if pixel_mask is None else {"pixel_mask": pixel_mask.to(device)}
            group_outputs = model(pixel_values, task=group[0] if len(group) == 1 else None, **extra)
            outputs.update(
                {name: value.float() for name, value in head_outputs(group_outputs, group).items()}
            )
            if pixel_mask is not None:
                outputs.update({get_task(task).pixel_mask_field: extra["pixel_mask"] for task in group})
        return outputs

    def _forward_tiles(
        self, model: Any, inputs: Any, group: Sequence[str], device: Any, dtype: Any
    ) -> dict[str, torch.Tensor]:
        """One size group of `preprocess_tiles` inputs: the whole-picture heads (cls) on `pixel_values`, the
        others on the tiles, `tile_batch_size` at a time, their outputs merged back per image (`merge_tiles`)."""
        outputs: dict[str, torch.Tensor] = {}
        whole = tuple(task for task in group if get_task(task).tile_merge is None)
        tiled = tuple(task for task in group if get_task(task).tile_merge is not None)
        if whole:
            pixel_values = inputs["pixel_values"].to(device=device, dtype=dtype)
            pixel_mask = inputs.get("pixel_mask")
            extra = {} if pixel_mask is None else {"pixel_mask": pixel_mask.to(device)}
            whole_outputs = model(pixel_values, task=whole[0] if len(whole) == 1 else None, **extra)
            outputs.update(
                {name: value.float() for name, value in head_outputs(whole_outputs, whole).items()}
            )
        tiles, settings = inputs["tiles"], inputs["tile_settings"]
        chunks: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(tiles), self.tile_batch_size):
            chunk = self(list(tiles[start : start + self.tile_batch_size]), **settings)["pixel_values"]
            chunk = chunk.to(device=device, dtype=dtype)
            chunk_outputs = model(chunk, task=tiled[0] if len(tiled) == 1 else None)
            chunks.append(
                {name: value.float().cpu() for name, value in head_outputs(chunk_outputs, tiled).items()}
            )
        tile_outputs = {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
        merged = self.merge_tiles(
            tile_outputs, inputs["tile_boxes"], inputs["tile_image_index"], inputs["image_sizes"]
        )
        return outputs | merged

    def merge_tiles(
        self,
        tile_outputs: dict[str, torch.Tensor],
        tile_boxes: torch.Tensor,
        tile_image_index: torch.Tensor,
        image_sizes: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The outputs of the tiles of `preprocess_tiles` back per image, as if each image had gone through whole:
        - detection (`det_logits`, `det_centerness_logits`, `pred_boxes`): every tile's locations, their boxes
          shifted and scaled from the tile to the image (normalised cx, cy, w, h of the image), pooled per image;
          images with fewer tiles are padded with locations of score 0. `post_process_object_detection`'s
          class-wise NMS (`torchvision.ops.batched_nms`) then merges the duplicates of an object seen by
          overlapping tiles;
        - segmentation (`seg_logits`): the tiles' logits stitched over the whole image at the model's resolution
          (`tile_canvas`, `stitch`: overlaps averaged); images of different sizes are padded at the bottom / right
          and `seg_pixel_mask` marks each image's part (the post-processing and the anomaly score read it).
        """
        merged: dict[str, torch.Tensor] = {}
        sizes = [tuple(int(value) for value in size) for size in image_sizes.tolist()]
        owners = [torch.nonzero(tile_image_index == index).flatten() for index in range(len(sizes))]
        boxes = tile_boxes.tolist()
        if "det_logits" in tile_outputs:
            merged.update(self._merge_detections(tile_outputs, boxes, owners, sizes))
        if "seg_logits" in tile_outputs:
            logits = tile_outputs["seg_logits"]
            canvases = []
            for (height, width), tiles in zip(sizes, owners):
                placed, canvas = tile_canvas(
                    [boxes[i] for i in tiles.tolist()], height, width, tuple(logits.shape[-2:])
                )
                canvases.append(stitch(logits[tiles], placed, canvas))
            shapes = {tuple(canvas.shape[-2:]) for canvas in canvases}
            if len(shapes) == 1:
                merged["seg_logits"] = torch.stack(canvases)
            else:
                height = max(canvas.shape[-2] for canvas in canvases)
                width = max(canvas.shape[-1] for canvas in canvases)
                padded = canvases[0].new_zeros((len(canvases), canvases[0].shape[0], height, width))
                mask = torch.zeros((len(canvases), height, width), dtype=torch.int64)
                for index, canvas in enumerate(canvases):
                    padded[index, :, : canvas.shape[-2], : canvas.shape[-1]] = canvas
                    mask[index, : canvas.shape[-2], : canvas.shape[-1]] = 1
                merged["seg_logits"], merged[get_task("seg").pixel_mask_field] = padded, mask
        return merged

    @staticmethod
    def _merge_detections(
        tile_outputs: dict[str, torch.Tensor],
        boxes: list[list[int]],
        owners: list[torch.Tensor],
        sizes: list[tuple[int, int]],
    ) -> dict[str, torch.Tensor]:
        logits, pred_boxes = tile_outputs["det_logits"], tile_outputs["pred_boxes"]
        centerness = tile_outputs.get("det_centerness_logits")
        locations = logits.shape[1]
        most = max(len(tiles) for tiles in owners) * locations
        # padding locations score sigmoid(-1e4) = 0: never above a threshold, never an image's maximum
        pooled_logits = logits.new_full((len(sizes), most, logits.shape[-1]), -1e4)
        pooled_boxes = pred_boxes.new_zeros((len(sizes), most, 4))
        pooled_centerness = None if centerness is None else centerness.new_full((len(sizes), most), -1e4)
        for index, ((height, width), tiles) in enumerate(zip(sizes, owners)):
            tile_list = tiles.tolist()
            box = torch.tensor([boxes[i] for i in tile_list], dtype=torch.float32)  # (n, 4) x0 y0 x1 y1
            # a tile box's offset and size as fractions of the image (exact 0 and 1 for a tile of the whole image)
            offset = torch.stack([box[:, 0] / width, box[:, 1] / height], dim=1)[:, None]  # (n, 1, 2)
            scale = torch.stack([(box[:, 2] - box[:, 0]) / width, (box[:, 3] - box[:, 1]) / height], dim=1)[
                :, None
            ]
            tile_boxes_ = pred_boxes[tiles]  # (n, L, 4) normalised cx, cy, w, h of the tile
            shifted = torch.cat([offset + tile_boxes_[..., :2] * scale, tile_boxes_[..., 2:] * scale], dim=-1)
            count = len(tile_list) * locations
            pooled_logits[index, :count] = logits[tiles].reshape(count, -1)
            pooled_boxes[index, :count] = shifted.reshape(count, 4)
            if pooled_centerness is not None:
                pooled_centerness[index, :count] = centerness[tiles].reshape(count)
        merged = {"det_logits": pooled_logits, "pred_boxes": pooled_boxes}
        if pooled_centerness is not None:
            merged["det_centerness_logits"] = pooled_centerness
        return merged

    def predict(
        self,
        model: Any,
        images: Any,
        tasks: Sequence[str] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """The raw outputs of `tasks` (default: every head) on `images`, each head fed at its own input size (one
        forward pass per distinct size): `forward_size_groups(model, preprocess_size_groups(images, tasks), tasks)`.
        Feed them to the `post_process_*` methods (boxes and masks for the original image sizes).

        With `tile_size` (high-resolution inspection), the detection and segmentation heads run on overlapping
        square tiles of `tile_size` pixels of each image (`tile_boxes`: a regular grid with stride `tile_size -
        tile_overlap`, the last row / column shifted to end at the image's edge; a side shorter than a tile is
        covered by one tile spanning it, so an image smaller than a tile runs whole, never padded), resized to
        the head's input size, `tile_batch_size` tiles per forward pass; their outputs are merged back per image
        (`merge_tiles`: boxes shifted to the image and merged by the post-processing's class-wise NMS,
        segmentation logits stitched with overlaps averaged). The classification head sees the whole image.
        Image-level anomaly scores (`post_process_anomaly_score`) read the merged outputs."""
        tasks = TASKS if tasks is None else tuple(tasks)
        inputs = self.preprocess_size_groups(images, tasks)
        return self.forward_size_groups(model, inputs, tasks, device=device, dtype=dtype)

    def preprocess(
        self,
        images: Any,
        annotations: list[dict[str, Any]] | dict[str, Any] | None = None,
        segmentation_maps: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        r"""
        annotations: COCO-style detection annotations, one dict per image (see the class docstring).
        segmentation_maps: one class-id map per image (PIL "L"/"P", numpy or tensor of shape (H, W)).
        task: "cls", "det" or "seg" resizes to that task's entry of `task_sizes` (default: `self.task`); an
            explicit `size` wins.
        """
        if kwargs.get("size") is None:
            kwargs["size"] = self.size_for(kwargs.get("task"))
        else:
            self._check_task(kwargs.get("task"))
        return super().preprocess(images, annotations, segmentation_maps, **kwargs)

    def _preprocess_image_like_inputs(
        self,
        images: Any,
        annotations: Any,
        segmentation_maps: Any,
        do_convert_rgb: bool,
        input_data_format: ChannelDimension | None,
        return_tensors: str | None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        if annotations is not None and segmentation_maps is not None:
            raise ValueError(
                "Pass detection `annotations` or `segmentation_maps`, not both: labels are per task."
            )
        if do_convert_rgb:
            images = _pil_to_rgb(images)  # the project's RGB rules (16-bit, alpha) before the backend's
        images = self._prepare_image_like_inputs(
            images=images, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, device=device
        )
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        do_pad = kwargs.pop("do_pad", False)
        kwargs.pop("pad_size", None)
        pixel_values = self._preprocess(images, do_pad=False, pad_size=None, return_tensors=None, **kwargs)[
            "pixel_values"
        ]
        resized_sizes = [tuple(image.shape[-2:]) for image in pixel_values]
        data: dict[str, Any] = {}
        if do_pad:
            pixel_values, pixel_mask = self.pad(pixel_values, return_mask=True)
            data["pixel_mask"] = pixel_mask
        elif return_tensors and len(set(resized_sizes)) > 1:
            raise ValueError(
                f"Images were resized to different sizes {sorted(set(resized_sizes))}; set do_pad=True to batch "
                "them, or use a fixed size such as {'height': 512, 'width': 512}."
            )
        data["pixel_values"] = pixel_values

        if segmentation_maps is not None:
            data["labels"] = self._prepare_segmentation_maps(
                segmentation_maps, original_sizes, resized_sizes, do_pad
            )
        batch = BatchFeature(data=data, tensor_type=return_tensors)
        if annotations is not None:
            batch["labels"] = self._prepare_annotations(annotations, original_sizes)
        return batch

    def _prepare_segmentation_maps(
        self,
        segmentation_maps: Any,
        original_sizes: list[tuple[int, int]],
        resized_sizes: list[tuple[int, int]],
        do_pad: bool,
    ) -> list[torch.Tensor]:
        maps = self._prepare_image_like_inputs(
            images=segmentation_maps,
            expected_ndims=2,
            do_convert_rgb=False,
            input_data_format=ChannelDimension.FIRST,
        )
        if len(maps) != len(original_sizes):
            raise ValueError(f"Got {len(maps)} segmentation maps for {len(original_sizes)} images.")
        labels = []
        for i, (mask, original, resized) in enumerate(zip(maps, original_sizes, resized_sizes)):
            if tuple(mask.shape[-2:]) != original:
                raise ValueError(
                    f"Segmentation map {i} has size {tuple(mask.shape[-2:])} but its image has size {original} "
                    "(height, width)."
                )
            mask = tvF.resize(mask, list(resized), interpolation=tvF.InterpolationMode.NEAREST_EXACT)
            labels.append(mask[0].to(torch.int64))
        if do_pad:
            height = max(mask.shape[0] for mask in labels)
            width = max(mask.shape[1] for mask in labels)
            labels = [
                F.pad(mask, (0, width - mask.shape[1], 0, height - mask.shape[0]), value=self.ignore_index)
                for mask in labels
            ]
        return labels

    def _prepare_annotations(
        self, annotations: list[dict[str, Any]] | dict[str, Any], original_sizes: list[tuple[int, int]]
    ) -> list[BatchFeature]:
        if isinstance(annotations, dict):
            annotations = [annotations]
        if len(annotations) != len(original_sizes):
            raise ValueError(f"Got {len(annotations)} annotation dicts for {len(original_sizes)} images.")
        labels = []
        for i, (target, (height, width)) in enumerate(zip(annotations, original_sizes)):
            objects = target.get("annotations", [])
            boxes = torch.tensor([obj["bbox"] for obj in objects], dtype=torch.float32).reshape(-1, 4)
            if (boxes[:, 2:] < 0).any():
                bad = (boxes[:, 2:] < 0).any(dim=1).nonzero().flatten().tolist()
                raise ValueError(
                    f"Image {i}: annotations {bad} have a negative box width or height (COCO xywh)."
                )
            boxes = box_convert(boxes, "xywh", "xyxy")
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            normalised = box_convert(boxes, "xyxy", "cxcywh") / torch.tensor([width, height, width, height])
            labels.append(
                BatchFeature(
                    {
                        "class_labels": torch.tensor(
                            [obj["category_id"] for obj in objects], dtype=torch.int64
                        ),
                        "boxes": normalised,
                        "image_id": torch.tensor([target.get("image_id", i)]),
                        "orig_size": torch.tensor([height, width]),
                    }
                )
            )
        return labels

    # ------------------------------------------------------------------------------------------ post-processing
    def post_process_image_classification(
        self, outputs: Any, top_k: int = 5, id2label: dict[int, str] | None = None
    ) -> list[dict[str, Any]]:
        """Top-k classes of each image: `[{"scores": (k,), "labels": (k,), "label_names": [...]?}, ...]`.

        Scores are softmax probabilities. `label_names` is added when `id2label` is given.
        """
        logits = output_field(outputs, "logits", "cls_logits")
        if logits is None:
            raise ValueError("The outputs hold no classification logits (`logits` or `cls_logits`).")
        probabilities = logits.float().softmax(dim=-1)
        scores, labels = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
        results = []
        for image_scores, image_labels in zip(scores, labels):
            result: dict[str, Any] = {"scores": image_scores, "labels": image_labels}
            if id2label is not None:
                result["label_names"] = [id2label[int(label)] for label in image_labels]
            results.append(result)
        return results

    def post_process_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.5,
        target_sizes: torch.Tensor | list[tuple[int, int]] | None = None,
        top_k: int = 100,
        nms_threshold: float = 0.6,
        pre_nms_top_k: int = 1000,
    ) -> list[dict[str, torch.Tensor]]:
        """Detections in the DETR format: one `{"scores", "labels", "boxes"}` dict per image.

        A location's score for a class is `sqrt(sigmoid(class logit) * sigmoid(centerness logit))`. Candidates
        above `threshold` (at most `pre_nms_top_k`) go through class-wise NMS at `nms_threshold`, and the best
        `top_k` are kept, sorted by score. Boxes are absolute (x_min, y_min, x_max, y_max) in `target_sizes`
        (one (height, width) per image; clipped to it), or normalised to [0, 1] when no sizes are given.
        """
        logits = output_field(outputs, "logits", "det_logits")
        pred_boxes = output_field(outputs, "pred_boxes")
        if logits is None or pred_boxes is None:
            raise ValueError(
                "The outputs hold no detection predictions (`logits`/`det_logits` and `pred_boxes`)."
            )
        centerness = output_field(outputs, "centerness_logits", "det_centerness_logits")
        probabilities = logits.float().sigmoid()
        if centerness is not None:
            probabilities = (probabilities * centerness.float().sigmoid()[..., None]).sqrt()
        sizes = _as_size_list(target_sizes, len(logits))
        num_classes = probabilities.shape[-1]

        results = []
        for i, (image_scores, image_boxes) in enumerate(zip(probabilities, pred_boxes.float())):
            flat_scores = image_scores.flatten()
            candidates = (flat_scores > threshold).nonzero().flatten()
            if len(candidates) > pre_nms_top_k:
                candidates = candidates[flat_scores[candidates].topk(pre_nms_top_k).indices]
            scores = flat_scores[candidates]
            labels = candidates % num_classes
            boxes = box_convert(image_boxes[candidates // num_classes], "cxcywh", "xyxy")
            if sizes is not None:
                height, width = sizes[i]
                boxes = boxes * boxes.new_tensor([width, height, width, height])
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            else:
                boxes = boxes.clamp(0, 1)
            keep = batched_nms(boxes, scores, labels, nms_threshold)[:top_k]
            results.append({"scores": scores[keep], "labels": labels[keep], "boxes": boxes[keep]})
        return results

    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: torch.Tensor | list[tuple[int, int]] | None = None
    ) -> list[torch.Tensor]:
        """One `(height, width)` class-id map per image, resized (bilinear on the logits) to `target_sizes`. Where
        the outputs hold a `seg_pixel_mask` (padded inputs, or tiled images of different sizes), each image's
        logits are first cropped to its part (padding sits at the bottom / right)."""
        logits = output_field(outputs, "logits", "seg_logits")
        if logits is None:
            raise ValueError("The outputs hold no segmentation logits (`logits` or `seg_logits`).")
        pixel_mask = output_field(outputs, get_task("seg").pixel_mask_field)
        images = list(logits)
        if pixel_mask is not None:
            images = [
                image_logits[:, : int(mask.any(dim=1).sum()), : int(mask.any(dim=0).sum())]
                for image_logits, mask in zip(images, pixel_mask)
            ]
        sizes = _as_size_list(target_sizes, len(logits))
        if sizes is None:
            return [image_logits.argmax(dim=0) for image_logits in images]
        return [
            F.interpolate(image_logits[None].float(), size=size, mode="bilinear", align_corners=False)[
                0
            ].argmax(0)
            for image_logits, size in zip(images, sizes)
        ]

    def post_process_anomaly_score(
        self,
        outputs: Any,
        source: str = "max",
        threshold: float | None = None,
        normal_class_id: int | None = None,
        pixel_mask: torch.Tensor | None = None,
        heads: Any = None,
    ) -> list[dict[str, Any]]:
        """Image-level anomaly scores in [0, 1] (higher = more anomalous) and, with `threshold`, the OK / NG verdict.

        Each head present in the multi-task `outputs` gives one score per image:
        - `cls`: 1 - softmax probability of the `normal` class (`normal_class_id`; the head gives no score
          without one, e.g. a classifier of part names);
        - `det`: the highest detection score of any location and class, `sqrt(sigmoid(class) * sigmoid(centerness))`
          as in `post_process_object_detection` (no threshold or NMS needed for a maximum);
        - `seg`: the anomalous-pixel area, the fraction of the image's pixels (`pixel_mask`: 1 on the image, 0 on
          padding; default the `seg_pixel_mask` that `forward_size_groups` puts in the outputs) whose most likely
          class is not the background (class 0).
        (Each head's score is its `anomaly_score` in `tasks_cadmtl`.)
        `source` picks the score that decides (`"max"`: the largest head score). An image is NG when its score is
        at or above `threshold` (the model config's calibrated `verdict_threshold`). `heads` (e.g. the config's
        `verdict_heads`) keeps only those heads' scores, so `"max"` ignores heads that were never trained.

        Returns one `{"anomaly_score": float, "head_scores": {head: float}, "verdict": "OK" | "NG"}` per image
        (`verdict` only with a threshold).
        """
        if source not in VERDICT_SOURCES:
            raise ValueError(f"source {source!r} is not one of {VERDICT_SOURCES}.")
        wanted = heads
        heads = self._head_anomaly_scores(outputs, normal_class_id, pixel_mask)
        if wanted is not None:
            heads = {head: scores for head, scores in heads.items() if head in wanted}
        if not heads:
            raise ValueError(
                "No head gives an anomaly score: the outputs need `cls_logits` (with a normal class), "
                "`det_logits` or `seg_logits`."
            )
        if source == "max":
            scores = torch.stack(list(heads.values())).amax(dim=0)
        elif source in heads:
            scores = heads[source]
        else:
            raise ValueError(
                f"The verdict reads the {source!r} head, but the outputs give only {sorted(heads)}."
            )
        results = []
        for index, score in enumerate(scores.tolist()):
            result: dict[str, Any] = {
                "anomaly_score": score,
                "head_scores": {head: float(values[index]) for head, values in heads.items()},
            }
            if threshold is not None:
                result["verdict"] = "NG" if score >= threshold else "OK"
            results.append(result)
        return results

    def post_process_verdict(
        self,
        outputs: Any,
        config: Any,
        pixel_mask: torch.Tensor | None = None,
        threshold: float | None = None,
    ) -> list[dict[str, Any]]:
        """`post_process_anomaly_score` with the model config's verdict settings: its `verdict_source`, its
        calibrated `verdict_threshold` (or `threshold` to override it), its `normal` class and `verdict_heads`.

        Returns one `{"verdict": "OK" | "NG", "anomaly_score": float, "head_scores": {head: float}}` per image. A
        model none of whose heads gives an anomaly score (`config.verdict_heads` empty: e.g. a classifier of part
        names without a `normal` class and no detection / segmentation head) has no verdict: `verdict` and
        `anomaly_score` are None. A model whose `config.verdict_status` is `"uninformative"` (its score did not
        separate normal from anomalous validation images) gives the scores with `verdict` None, unless `threshold`
        is passed explicitly.
        """
        if not config.verdict_heads:
            batch_size = next(len(value) for value in _output_tensors(outputs))
            return [{"verdict": None, "anomaly_score": None, "head_scores": {}} for _ in range(batch_size)]
        withheld = threshold is None and getattr(config, "verdict_status", None) == "uninformative"
        results = self.post_process_anomaly_score(
            outputs,
            source=config.verdict_source,
            threshold=config.verdict_threshold if threshold is None else threshold,
            normal_class_id=config.normal_class_id,
            pixel_mask=pixel_mask,
            heads=config.verdict_heads,
        )
        if withheld:  # an OK / NG from a score that does not separate would only look like information
            for result in results:
                result["verdict"] = None
        return results

    @staticmethod
    def _head_anomaly_scores(
        outputs: Any, normal_class_id: int | None, pixel_mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        heads: dict[str, torch.Tensor] = {}
        for task in TASK_DEFINITIONS.values():
            score = task.anomaly_score(outputs, normal_class_id, pixel_mask)
            if score is not None:
                heads[task.name] = score
        return heads


CadMtlImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["CadMtlImageProcessor"]
