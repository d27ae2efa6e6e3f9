"""Running a saved CadMtl model on image files and writing one overlay PNG per image at its own resolution.

Example:

```python
from cadmtl.pictures.predict import render_predictions

render_predictions("outputs/run/model", ["photos/"], "outputs/run/pictures", det_threshold=0.4)
```
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from cadmtl.pictures.overlays import ImagePrediction, draw_predictions
from dataset_scripts.images import to_rgb
from dataset_scripts.schema import TASKS

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "TASKS", "ImageSource", "collect_images", "load_image", "render_predictions"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# ----------------------------------------------------------------------------------------------------------
# Finding and reading images
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSource:
    """An image file to draw and the relative path (with `.png`) its overlay gets under the output folder."""

    path: Path
    output_name: Path


def collect_images(
    inputs: Iterable[str | os.PathLike], exclude: str | os.PathLike | None = None
) -> list[ImageSource]:
    """The image files named by `inputs` (files or folders) and the names their overlays will get.

    Folders are walked recursively for `IMAGE_EXTENSIONS` in any letter case (sorted, so the order is stable);
    files named explicitly are taken whatever their extension (a `.tif` works if PIL reads it). An overlay keeps
    the path relative to its folder, with `.png` as extension; with several inputs each folder's images go under
    a sub-folder named after it. When two images would get the same name (`a.jpg` and `a.png`) both keep their
    original extension (`a.jpg.png`, `a.png.png`). Files inside `exclude` (the output folder) are skipped so a
    second run does not draw on its own overlays.

    Raises:
        FileNotFoundError: an input does not exist.
        ValueError: no input was given, or the inputs hold no image file.
    """
    inputs = [Path(item) for item in inputs]
    if not inputs:
        raise ValueError("collect_images: no image file or folder was given")
    excluded = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        if item.is_dir():
            prefix = Path(item.resolve().name) if len(inputs) > 1 else Path()
            # an output folder inside the input folder is skipped; one equal to it cannot be (nothing would be left)
            skip = excluded if excluded is not None and excluded != item.resolve() else None
            for path in sorted(item.rglob("*")):
                if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                if skip is not None and path.resolve().is_relative_to(skip):
                    continue
                found.append((path, prefix / path.relative_to(item)))
        elif item.is_file():
            found.append((item, Path(item.name)))
        else:
            raise FileNotFoundError(f"collect_images: {item} does not exist")
    if not found:
        raise ValueError(
            f"collect_images: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, inputs))}"
        )
    return _unique_output_names(found)


def _unique_output_names(found: list[tuple[Path, Path]]) -> list[ImageSource]:
    def first_choice(relative: Path) -> Path:
        return relative.with_suffix(".png")

    counts: dict[Path, int] = {}
    for _, relative in found:
        counts[first_choice(relative)] = counts.get(first_choice(relative), 0) + 1
    sources, taken = [], set()
    for path, relative in found:
        name = first_choice(relative)
        if counts[name] > 1:
            name = relative.with_name(relative.name + ".png")
        # the same file reached through two inputs, or a.jpg.png next to a.jpg: number the later ones
        candidate, number = name, 2
        while candidate in taken:
            candidate = name.with_name(f"{name.stem}-{number}.png")
            number += 1
        taken.add(candidate)
        sources.append(ImageSource(path, candidate))
    return sources


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an upright 8-bit RGB image (its first frame for multi-frame files).

    EXIF orientation is applied (the overlay looks like the photo does in a viewer, and the model sees the same
    pixels); every mode is converted by the project's one rule, :func:`dataset_scripts.images.to_rgb`.
    """
    with Image.open(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
    return to_rgb(image)


def _read_images(sources: Sequence[ImageSource]) -> Iterator[tuple[ImageSource, Image.Image | None, str]]:
    for source in sources:
        try:
            yield source, load_image(source.path), ""
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            # PIL reports truncated or non-image files as OSError, some broken headers as SyntaxError/ValueError
            yield source, None, f"{type(error).__name__}: {error}"


# ----------------------------------------------------------------------------------------------------------
# Running the model
# ----------------------------------------------------------------------------------------------------------

# Logits resized to a large photo cost classes x height x width floats; above this many the class map is
# computed at a smaller size and enlarged with nearest neighbour.
_MAX_SEGMENTATION_LOGITS = 2**26


def _load_model_and_processor(model_dir: str | os.PathLike, device: str | torch.device) -> tuple[Any, Any]:
    from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

    model = CadMtlModel.from_pretrained(model_dir).to(device).eval()
    try:
        processor = CadMtlImageProcessor.from_pretrained(model_dir)
    except OSError as error:
        logger.warning(
            "%s has no usable preprocessor_config.json (%s); using the default CadMtlImageProcessor (512x512)",
            model_dir,
            error,
        )
        processor = CadMtlImageProcessor()
    return model, processor


@torch.inference_mode()
def _predict_batch(
    model: Any,
    processor: Any,
    images: list[Image.Image],
    tasks: tuple[str, ...],
    det_threshold: float,
    top_k_classes: int,
) -> list[ImagePrediction]:
    config = model.config
    # Each head runs at the input size it was trained at (the processor's `task_sizes`): one forward pass per
    # distinct size, all the heads of that size at once.
    outputs: dict[str, Any] = {}
    masks: dict[str, torch.Tensor | None] = {}
    for group in _tasks_by_size(processor, tasks):
        group_outputs, pixel_mask = _forward(model, processor, images, group)
        for task in group:
            outputs.update({field: group_outputs[field] for field in _TASK_FIELDS[task]})
            masks[task] = pixel_mask
    sizes = [(image.height, image.width) for image in images]
    predictions = [ImagePrediction() for _ in images]

    if "cls" in tasks:
        ranked = processor.post_process_image_classification(
            outputs, top_k=top_k_classes, id2label=dict(enumerate(config.cls_labels))
        )
        for prediction, result in zip(predictions, ranked):
            prediction.classes = [
                (name, float(score)) for name, score in zip(result["label_names"], result["scores"].tolist())
            ]
    if "det" in tasks:
        detections = processor.post_process_object_detection(
            outputs, threshold=det_threshold, target_sizes=sizes
        )
        for prediction, result in zip(predictions, detections):
            prediction.boxes = result["boxes"].cpu().numpy()
            prediction.box_scores = result["scores"].cpu().numpy()
            prediction.box_labels = result["labels"].cpu().numpy()
    if "seg" in tasks:
        pixel_mask = masks["seg"]
        for index, prediction in enumerate(predictions):
            logits = outputs["seg_logits"][index]
            if pixel_mask is not None:
                # padding sits at the bottom / right: keep the part of the input that is the image
                rows, columns = pixel_mask[index].any(dim=1).sum(), pixel_mask[index].any(dim=0).sum()
                logits = logits[:, : int(rows), : int(columns)]
            prediction.segmentation = _class_map(processor, logits, sizes[index])
    return predictions


_TASK_FIELDS = {
    "cls": ("cls_logits",),
    "det": ("det_logits", "det_centerness_logits", "pred_boxes"),
    "seg": ("seg_logits",),
}


def _tasks_by_size(processor: Any, tasks: Sequence[str]) -> list[tuple[str, ...]]:
    """`tasks` grouped by the input size the processor gives each (`task_sizes`, else its `size`)."""
    groups: dict[tuple, list[str]] = {}
    for task in tasks:
        size = processor.size_for(task) if hasattr(processor, "size_for") else dict(processor.size)
        groups.setdefault(tuple(sorted(size.items())), []).append(task)
    return [tuple(group) for group in groups.values()]


def _forward(
    model: Any, processor: Any, images: list[Image.Image], tasks: tuple[str, ...]
) -> tuple[Any, torch.Tensor | None]:
    """The model's outputs for `tasks` on `images` preprocessed at the size of those tasks, and the pixel mask."""
    device = next(model.parameters()).device
    size = processor.size_for(tasks[0])
    fixed_size = size.get("height") is not None
    inputs = processor(images, return_tensors="pt", size=size, **({} if fixed_size else {"do_pad": True}))
    pixel_values = inputs["pixel_values"].to(device)
    pixel_mask = inputs.get("pixel_mask")
    pixel_mask = pixel_mask.to(device) if pixel_mask is not None else None
    outputs = model(pixel_values, task=tasks[0] if len(tasks) == 1 else None, pixel_mask=pixel_mask)
    return outputs, pixel_mask


def _class_map(processor: Any, logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    shrink = min(1.0, math.sqrt(_MAX_SEGMENTATION_LOGITS / (logits.shape[0] * height * width)))
    work_size = (max(1, round(height * shrink)), max(1, round(width * shrink)))
    (class_map,) = processor.post_process_semantic_segmentation(
        {"seg_logits": logits[None]}, target_sizes=[work_size]
    )
    class_map = class_map.cpu().numpy().astype(np.uint8)  # the config keeps seg classes below 255
    if work_size != (height, width):
        class_map = np.asarray(Image.fromarray(class_map).resize((width, height), Image.Resampling.NEAREST))
    return class_map


def render_predictions(
    model_dir: str | os.PathLike,
    images: str | os.PathLike | Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    det_threshold: float = 0.3,
    top_k_classes: int = 3,
    tasks: Sequence[str] = TASKS,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
) -> list[Path]:
    """Run a CadMtl model on image files and write one overlay PNG per image; returns the written paths.

    Args:
        model_dir: a saved model folder or a Hub repo id (anything `CadMtlModel.from_pretrained` takes); its
            `preprocessor_config.json` sets the network input size of each head (`task_sizes`, else `size`).
        images: image files and/or folders (walked recursively, see [`collect_images`]).
        output_dir: where the overlays go, mirroring the input names with `.png` (created if needed).
        det_threshold: minimum detection score for a box to be drawn.
        top_k_classes: how many classes the banner lists.
        tasks: which predictions to draw, any of "cls", "det", "seg"; the model runs once per batch and distinct
            input size among them (each head at the size it was trained at, from the processor's `task_sizes`).
        device: where the model runs ("cpu", "cuda", "cuda:1", ...).
        batch_size: images per forward pass.

    Files PIL cannot read are skipped, counted and reported in one warning (file and reason); if none can be
    read a `ValueError` names them.
    """
    tasks = tuple(dict.fromkeys(tasks))
    unknown = [task for task in tasks if task not in TASKS]
    if not tasks or unknown:
        raise ValueError(f"render_predictions: tasks must be a non-empty subset of {TASKS}, got {tasks}")
    if not 0.0 <= det_threshold <= 1.0:
        raise ValueError(f"render_predictions: det_threshold must be in [0, 1], got {det_threshold}")
    if top_k_classes < 1 or batch_size < 1:
        raise ValueError(
            f"render_predictions: top_k_classes and batch_size must be >= 1, got {top_k_classes} and {batch_size}"
        )
    output_dir = Path(output_dir)
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    sources = collect_images(images, exclude=output_dir)
    overwritten = [str(s.path) for s in sources if (output_dir / s.output_name).resolve() == s.path.resolve()]
    if overwritten:
        raise ValueError(
            f"render_predictions: the overlays would overwrite their input images ({', '.join(overwritten[:5])}); "
            "choose an output_dir outside the image folders"
        )
    model, processor = _load_model_and_processor(model_dir, device)
    config = model.config

    written: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    batch: list[tuple[ImageSource, Image.Image]] = []

    def flush() -> None:
        pictures = [picture for _, picture in batch]
        predictions = _predict_batch(model, processor, pictures, tasks, det_threshold, top_k_classes)
        for (source, picture), prediction in zip(batch, predictions):
            overlay = draw_predictions(picture, prediction, config.det_labels, config.seg_labels)
            target = output_dir / source.output_name
            target.parent.mkdir(parents=True, exist_ok=True)
            overlay.save(target, format="PNG")
            written.append(target)
        progress.update(len(batch))
        batch.clear()

    with tqdm(total=len(sources), desc="drawing predictions", unit="img") as progress:
        for source, picture, reason in _read_images(sources):
            if picture is None:
                unreadable.append((source.path, reason))
                progress.update(1)
                continue
            batch.append((source, picture))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()

    if unreadable:
        listing = "; ".join(f"{path} ({reason})" for path, reason in unreadable[:20])
        more = f"; and {len(unreadable) - 20} more" if len(unreadable) > 20 else ""
        if not written:
            raise ValueError(
                f"render_predictions: none of the {len(unreadable)} image files could be read: {listing}{more}"
            )
        logger.warning(
            "Skipped %d of %d image files that could not be read: %s%s",
            len(unreadable),
            len(sources),
            listing,
            more,
        )
    return written
