"""Pictures of what a CadMtl model sees, and charts of an evaluation run.

* Prediction overlays: [`render_predictions`] runs a saved model on image files and writes one PNG per image at
  the image's own resolution: the segmentation mask as a translucent colour layer (background left clear) with a
  legend of the classes present, the detection boxes tagged "label score", and the top classes in a corner
  banner. [`draw_predictions`] draws an [`ImagePrediction`] on a PIL image (use it with your own predictions).
* Evaluation charts: [`plot_confusion_matrix`] and [`plot_per_class`] draw one `MetricsReport.to_dict()`;
  [`plot_evaluation`] draws both for every config of an `eval_results.json`.

Colours come from one fixed, colour-blind-friendly palette ([`class_color`]): Okabe-Ito first, then tab20
without its greys, then evenly spread hues. A detection class and a segmentation class with the same name share
a colour ([`task_colors`]), so a "dent" box and a "dent" mask look alike.

Example:

```python
from cadmtl.pictures.overlays import plot_evaluation, render_predictions

render_predictions("outputs/run/model", ["photos/"], "outputs/run/pictures", det_threshold=0.4)
plot_evaluation("outputs/run/eval_results.json", "outputs/run/charts")
```
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps
from tqdm.auto import tqdm

from dataset_scripts.images import to_rgb
from dataset_scripts.schema import TASKS

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImagePrediction",
    "ImageSource",
    "class_color",
    "collect_images",
    "draw_predictions",
    "fold_confusion_matrix",
    "load_image",
    "normalized_confusion_matrix",
    "per_class_rows",
    "plot_confusion_matrix",
    "plot_evaluation",
    "plot_per_class",
    "render_predictions",
    "task_colors",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

Color = tuple[int, int, int]

# ----------------------------------------------------------------------------------------------------------
# Palette
# ----------------------------------------------------------------------------------------------------------

# Okabe & Ito (2008) without black, which the banner and tags use for text.
_OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
# matplotlib's tab20 without its grey pair (grey reads as "nothing there" on photos).
_TAB20 = (
    "#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd",
    "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#bcbd22", "#dbdb8d", "#17becf", "#9edae5",
)  # fmt: skip
_GOLDEN_RATIO = (math.sqrt(5) - 1) / 2


def _hex_to_rgb(value: str) -> Color:
    return int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16)


_BASE_PALETTE: tuple[Color, ...] = tuple(_hex_to_rgb(value) for value in _OKABE_ITO + _TAB20)


def class_color(index: int) -> Color:
    """The fixed RGB colour of palette entry `index` (>= 0): the same on every call, run and machine.

    The first 7 entries are the Okabe-Ito colours, the next 18 tab20's; beyond that hues are spread by the golden
    ratio, so even 105 classes get distinct colours.
    """
    if index < 0:
        raise ValueError(f"class_color: the palette index must be >= 0, got {index}")
    if index < len(_BASE_PALETTE):
        return _BASE_PALETTE[index]
    step = index - len(_BASE_PALETTE)
    hue = (0.11 + step * _GOLDEN_RATIO) % 1.0
    saturation = (0.85, 0.6, 0.45)[step % 3]
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, 0.95)
    return round(red * 255), round(green * 255), round(blue * 255)


def task_colors(det_labels: Sequence[str], seg_labels: Sequence[str]) -> tuple[list[Color], list[Color]]:
    """One colour per detection class id and per segmentation class id of a model.

    Detection class `k` gets palette entry `k`. A segmentation class takes the colour of the detection class with
    the same name; the others take the next unused palette entries in id order. Segmentation id 0 (background)
    is never drawn; it gets black for completeness.
    """
    det_colors = [class_color(index) for index in range(len(det_labels))]
    by_name = dict(zip(det_labels, det_colors))
    next_index = len(det_labels)
    seg_colors: list[Color] = [(0, 0, 0)]
    for name in list(seg_labels)[1:]:
        if name in by_name:
            seg_colors.append(by_name[name])
        else:
            seg_colors.append(class_color(next_index))
            next_index += 1
    return det_colors, seg_colors


def _text_color(background: Color) -> Color:
    # WCAG relative luminance: dark text on light colours (yellow, light blue), white on dark ones
    def channel(value: int) -> float:
        value = value / 255
        return value / 12.92 if value <= 0.03928 else ((value + 0.055) / 1.055) ** 2.4

    red, green, blue = (channel(value) for value in background)
    return (0, 0, 0) if 0.2126 * red + 0.7152 * green + 0.0722 * blue > 0.179 else (255, 255, 255)


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
# Drawing one image
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ImagePrediction:
    """What the model predicted for one image, in that image's pixel frame.

    Attributes:
        classes: the top classes, best first, as (name, probability in [0, 1]); empty to draw no banner.
        boxes: `(n, 4)` absolute (x_min, y_min, x_max, y_max) boxes; `None` to draw no detection.
        box_scores: `(n,)` detection scores in [0, 1].
        box_labels: `(n,)` detection class ids (indices into the model's `det_labels`).
        segmentation: `(height, width)` class-id map (0 = background, drawn clear); `None` to draw no mask.
    """

    classes: list[tuple[str, float]] = field(default_factory=list)
    boxes: np.ndarray | None = None
    box_scores: np.ndarray | None = None
    box_labels: np.ndarray | None = None
    segmentation: np.ndarray | None = None


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow ships a scalable default font (no download); without FreeType it falls back to a fixed bitmap font.
    return ImageFont.load_default(size=size)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def draw_predictions(
    image: Image.Image,
    prediction: ImagePrediction,
    det_labels: Sequence[str],
    seg_labels: Sequence[str],
    *,
    mask_opacity: float = 0.45,
) -> Image.Image:
    """Draw `prediction` on a copy of `image` (returned as RGB, same size).

    The mask is blended at `mask_opacity` with a solid outline, so thin defects stay visible; boxes are drawn from
    the lowest score up so the best ones stay on top; the banner (top left) lists `prediction.classes` and the
    legend (bottom right) the mask classes present, largest first, with their share of the image.

    Raises:
        ValueError: the mask's size differs from the image's, or a class id is outside the label lists.
    """
    if not 0.0 <= mask_opacity <= 1.0:
        raise ValueError(f"draw_predictions: mask_opacity must be in [0, 1], got {mask_opacity}")
    canvas = image.convert("RGB")
    det_colors, seg_colors = task_colors(det_labels, seg_labels)
    width, height = canvas.size
    scale = max(min(width, height), 1)
    font_size = int(np.clip(round(scale * 0.03), 10, 36))
    line_width = max(1, round(scale / 300))

    legend: list[tuple[str, Color, float]] = []
    if prediction.segmentation is not None:
        canvas, legend = _draw_mask(canvas, prediction.segmentation, seg_labels, seg_colors, mask_opacity)
    if prediction.boxes is not None:
        _draw_boxes(
            canvas, prediction, det_labels, det_colors, _font(max(10, round(font_size * 0.8))), line_width
        )
    if prediction.classes or prediction.segmentation is not None:
        canvas = canvas.convert("RGBA")
        if prediction.classes:
            canvas = _draw_banner(canvas, prediction.classes, font_size)
        if prediction.segmentation is not None:
            canvas = _draw_legend(canvas, legend, font_size)
        canvas = canvas.convert("RGB")
    return canvas


def _draw_mask(
    canvas: Image.Image,
    segmentation: np.ndarray,
    seg_labels: Sequence[str],
    seg_colors: list[Color],
    opacity: float,
) -> tuple[Image.Image, list[tuple[str, Color, float]]]:
    class_map = np.asarray(segmentation)
    if class_map.shape != (canvas.height, canvas.width):
        raise ValueError(
            f"draw_predictions: the segmentation map has shape {class_map.shape} but the image is "
            f"{canvas.height}x{canvas.width} (height x width)"
        )
    class_map = class_map.astype(np.int64, copy=False)
    if class_map.size and (class_map.min() < 0 or class_map.max() >= len(seg_labels)):
        raise ValueError(
            f"draw_predictions: the segmentation map holds class ids outside [0, {len(seg_labels)}): "
            f"{sorted(set(np.unique(class_map).tolist()) - set(range(len(seg_labels))))[:5]}"
        )
    foreground = class_map != 0
    counts = np.bincount(class_map.ravel(), minlength=len(seg_labels))
    legend = [
        (seg_labels[class_id], seg_colors[class_id], counts[class_id] / class_map.size)
        for class_id in np.argsort(-counts, kind="stable")
        if class_id != 0 and counts[class_id] > 0
    ]
    if not foreground.any():
        return canvas, legend
    lookup = np.asarray(seg_colors, dtype=np.float32)
    pixels = np.asarray(canvas, dtype=np.float32)
    colored = lookup[class_map]
    pixels[foreground] = (1 - opacity) * pixels[foreground] + opacity * colored[foreground]
    # Outline: foreground pixels next to another class, thickened with the image so it shows at any size.
    edge = np.zeros_like(foreground)
    edge[:, 1:] |= class_map[:, 1:] != class_map[:, :-1]
    edge[:, :-1] |= class_map[:, 1:] != class_map[:, :-1]
    edge[1:, :] |= class_map[1:, :] != class_map[:-1, :]
    edge[:-1, :] |= class_map[1:, :] != class_map[:-1, :]
    thickness = max(1, round(min(canvas.size) / 400))
    if thickness > 1:
        grown = Image.fromarray(edge.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * thickness - 1))
        edge = np.asarray(grown) > 0
    outline = edge & foreground
    pixels[outline] = colored[outline]
    return Image.fromarray(pixels.round().astype(np.uint8)), legend


def _draw_boxes(
    canvas: Image.Image,
    prediction: ImagePrediction,
    det_labels: Sequence[str],
    det_colors: list[Color],
    font: Any,
    line_width: int,
) -> None:
    boxes = np.asarray(prediction.boxes, dtype=np.float64).reshape(-1, 4)
    count = len(boxes)
    scores = np.asarray(
        prediction.box_scores if prediction.box_scores is not None else np.ones(count), dtype=np.float64
    ).reshape(-1)
    labels = np.asarray(
        prediction.box_labels if prediction.box_labels is not None else np.zeros(count), dtype=np.int64
    ).reshape(-1)
    if len(scores) != count or len(labels) != count:
        raise ValueError(
            f"draw_predictions: got {count} boxes, {len(scores)} scores and {len(labels)} labels; they must match"
        )
    if count and (labels.min() < 0 or labels.max() >= len(det_labels)):
        raise ValueError(
            f"draw_predictions: detection labels {sorted(set(labels.tolist()))[:5]} are outside "
            f"[0, {len(det_labels)})"
        )
    draw = ImageDraw.Draw(canvas)
    for index in np.argsort(scores, kind="stable"):
        x_min, y_min, x_max, y_max = boxes[index]
        color = det_colors[labels[index]]
        draw.rectangle([x_min, y_min, max(x_max, x_min), max(y_max, y_min)], outline=color, width=line_width)
        text = f"{det_labels[labels[index]]} {scores[index]:.2f}"
        text_width, text_height = _text_size(draw, text, font)
        pad = max(1, text_height // 5)
        tag_height = text_height + 2 * pad
        # above the box when it fits, else just inside its top edge; never past the right image edge
        top = y_min - tag_height if y_min - tag_height >= 0 else y_min
        left = min(max(x_min, 0), max(canvas.width - text_width - 2 * pad, 0))
        draw.rectangle([left, top, left + text_width + 2 * pad, top + tag_height], fill=color)
        draw.text((left + pad, top + pad), text, fill=_text_color(color), font=font, anchor="lt")


def _translucent_panel(
    canvas: Image.Image, box: tuple[float, float, float, float], fill: tuple[int, int, int, int]
) -> Image.Image:
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle(box, fill=fill)
    return Image.alpha_composite(canvas, layer)


def _draw_banner(canvas: Image.Image, classes: list[tuple[str, float]], font_size: int) -> Image.Image:
    fonts = [_font(font_size)] + [_font(max(10, round(font_size * 0.75)))] * (len(classes) - 1)
    lines = [f"{name} {100.0 * probability:.1f}%" for name, probability in classes]
    measure = ImageDraw.Draw(canvas)
    sizes = [_text_size(measure, line, font) for line, font in zip(lines, fonts)]
    pad = max(3, font_size // 4)
    spacing = max(2, font_size // 5)
    width = max(size[0] for size in sizes) + 2 * pad
    height = sum(size[1] for size in sizes) + spacing * (len(lines) - 1) + 2 * pad
    canvas = _translucent_panel(canvas, (0, 0, width, height), (0, 0, 0, 170))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for index, (line, font, (_, line_height)) in enumerate(zip(lines, fonts, sizes)):
        color = (255, 255, 255, 255) if index == 0 else (215, 215, 215, 255)
        draw.text((pad, y), line, fill=color, font=font, anchor="lt")
        y += line_height + spacing
    return canvas


def _draw_legend(canvas: Image.Image, entries: list[tuple[str, Color, float]], font_size: int) -> Image.Image:
    font = _font(max(10, round(font_size * 0.8)))
    measure = ImageDraw.Draw(canvas)
    if entries:
        lines = [(f"{name} {100.0 * share:.1f}%", color) for name, color, share in entries]
    else:
        lines = [("no anomaly pixels", None)]
    line_height = max(_text_size(measure, text, font)[1] for text, _ in lines)
    pad = max(3, font_size // 4)
    spacing = max(2, line_height // 3)
    swatch = line_height
    # keep the legend inside the image: the classes that do not fit are summed up in a last line
    fitting = max(1, (canvas.height - 2 * pad + spacing) // (line_height + spacing))
    if len(lines) > fitting:
        hidden = len(lines) - fitting + 1
        lines = [*lines[: fitting - 1], (f"+{hidden} more classes", None)]
    text_width = max(_text_size(measure, text, font)[0] for text, _ in lines)
    width = swatch + pad + text_width + 2 * pad
    height = len(lines) * line_height + (len(lines) - 1) * spacing + 2 * pad
    left, top = max(canvas.width - width, 0), max(canvas.height - height, 0)
    canvas = _translucent_panel(canvas, (left, top, canvas.width, canvas.height), (0, 0, 0, 170))
    draw = ImageDraw.Draw(canvas)
    y = top + pad
    for text, color in lines:
        x = left + pad
        if color is not None:
            draw.rectangle([x, y, x + swatch, y + swatch], fill=color, outline=(255, 255, 255))
        draw.text((x + swatch + pad, y), text, fill=(255, 255, 255, 255), font=font, anchor="lt")
        y += line_height + spacing
    return canvas


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
    device = next(model.parameters()).device
    fixed_size = getattr(processor.size, "height", None) is not None
    inputs = processor(images, return_tensors="pt", **({} if fixed_size else {"do_pad": True}))
    pixel_values = inputs["pixel_values"].to(device)
    pixel_mask = inputs.get("pixel_mask")
    pixel_mask = pixel_mask.to(device) if pixel_mask is not None else None
    outputs = model(pixel_values, task=tasks[0] if len(tasks) == 1 else None, pixel_mask=pixel_mask)
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
        for index, prediction in enumerate(predictions):
            logits = outputs.seg_logits[index]
            if pixel_mask is not None:
                # padding sits at the bottom / right: keep the part of the input that is the image
                rows, columns = pixel_mask[index].any(dim=1).sum(), pixel_mask[index].any(dim=0).sum()
                logits = logits[:, : int(rows), : int(columns)]
            prediction.segmentation = _class_map(processor, logits, sizes[index])
    return predictions


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
            `preprocessor_config.json` sets the network input size.
        images: image files and/or folders (walked recursively, see [`collect_images`]).
        output_dir: where the overlays go, mirroring the input names with `.png` (created if needed).
        det_threshold: minimum detection score for a box to be drawn.
        top_k_classes: how many classes the banner lists.
        tasks: which predictions to draw, any of "cls", "det", "seg"; the model runs once per batch either way.
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


# ----------------------------------------------------------------------------------------------------------
# Evaluation charts
# ----------------------------------------------------------------------------------------------------------

# (per-class metric, the count shown next to it) per task, in the order a report is recognised
_PER_CLASS_DEFAULTS = {
    "cls": ("acc@1", "support"),
    "det": ("AP", "num_ground_truth"),
    "seg": ("IoU", "gt_pixels"),
}
_COUNT_KEYS = ("support", "num_ground_truth", "gt_pixels")
_BAR_COLOR = "#0072B2"  # Okabe-Ito blue
_MAX_ANNOTATED_CLASSES = 20


def normalized_confusion_matrix(matrix: Any, normalize: bool = True) -> np.ndarray:
    """A confusion matrix (rows = ground truth) as floats, each row divided by its sum when `normalize`.

    A row without samples has no rate: it becomes NaN (drawn blank), not 0.

    Raises:
        ValueError: the matrix is not square, or holds negative or non-finite values.
    """
    values = np.asarray(matrix, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got shape {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError("confusion matrix must hold finite, non-negative counts")
    if not normalize:
        return values
    totals = values.sum(axis=1, keepdims=True)
    rates = np.full_like(values, np.nan)
    np.divide(values, totals, out=rates, where=totals > 0)
    return rates


def fold_confusion_matrix(
    matrix: Any, label_names: Sequence[str], max_classes: int
) -> tuple[np.ndarray, list[str]]:
    """Keep the `max_classes - 1` busiest classes of a big confusion matrix and sum the rest into one "other".

    Busiest = most samples in the ground truth plus the predictions; the kept classes stay in id order and every
    count is preserved (the folded row and column hold the sums). A matrix with at most `max_classes` classes is
    returned unchanged.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    names = list(label_names)
    if counts.shape != (len(names), len(names)):
        raise ValueError(f"confusion matrix has shape {counts.shape} but there are {len(names)} label names")
    if max_classes < 2:
        raise ValueError(f"max_classes must be >= 2, got {max_classes}")
    if len(names) <= max_classes:
        return counts, names
    activity = counts.sum(axis=0) + counts.sum(axis=1)
    kept = np.sort(np.argsort(-activity, kind="stable")[: max_classes - 1])
    groups = np.full(len(names), len(kept))
    groups[kept] = np.arange(len(kept))
    folded = np.zeros((len(kept) + 1, len(kept) + 1), dtype=np.int64)
    np.add.at(folded, (groups[:, None], groups[None, :]), counts)
    return folded, [names[index] for index in kept] + [f"other ({len(names) - len(kept)} classes)"]


def _figure(width: float, height: float) -> Any:
    # An Agg Figure without pyplot: no global state, safe in threads and on machines without a display.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _check_report(report: Mapping[str, Any], what: str) -> None:
    if not isinstance(report, Mapping) or "per_class" not in report:
        found = sorted(report) if isinstance(report, Mapping) else type(report).__name__
        raise ValueError(
            f"{what}: expected a MetricsReport.to_dict() with 'per_class' (and 'label_names', "
            f"'confusion_matrix'), got {found}"
        )


def plot_confusion_matrix(
    report: Mapping[str, Any],
    path: str | os.PathLike,
    normalize: bool = True,
    max_classes: int = 50,
    *,
    title: str | None = None,
) -> Path:
    """Draw the confusion matrix of a classification or segmentation report as a PNG.

    Rows are ground truth, columns predictions, each row normalised to rates when `normalize`; the y labels show
    each class's sample count. Up to 20 classes every non-zero cell also shows its rate and count. Above
    `max_classes` the quietest classes are folded into one "other" class (see [`fold_confusion_matrix`]).

    Raises:
        ValueError: the report has no confusion matrix (detection) or it does not match its label names.
    """
    _check_report(report, "plot_confusion_matrix")
    if report.get("confusion_matrix") is None:
        raise ValueError(
            "plot_confusion_matrix: the report has no confusion matrix (detection reports have none)"
        )
    counts, names = fold_confusion_matrix(
        report["confusion_matrix"], report.get("label_names", []), max_classes
    )
    normalized_confusion_matrix(counts, normalize=False)  # validates shape and values
    shown = normalized_confusion_matrix(counts, normalize)
    support = counts.sum(axis=1)
    size = len(names)
    side = float(np.clip(0.32 * size + 3.0, 5.0, 30.0))
    figure = _figure(side + 1.2, side)
    axis = figure.add_subplot()
    import matplotlib

    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")  # rows without samples
    image = axis.imshow(
        np.ma.masked_invalid(shown), cmap=colormap, vmin=0.0, vmax=1.0 if normalize else None, aspect="equal"
    )
    figure.colorbar(
        image, ax=axis, shrink=0.8, label="fraction of the true class" if normalize else "samples"
    )
    tick_font = 9 if size <= 30 else 7
    axis.set_xticks(range(size), names, rotation=90, fontsize=tick_font)
    axis.set_yticks(
        range(size), [f"{name} (n={count})" for name, count in zip(names, support)], fontsize=tick_font
    )
    axis.set_xlabel("predicted class")
    axis.set_ylabel("ground-truth class")
    if size <= _MAX_ANNOTATED_CLASSES:
        for row in range(size):
            for column in range(size):
                if counts[row, column] == 0:
                    continue
                text = (
                    f"{100 * shown[row, column]:.0f}%\n{counts[row, column]}"
                    if normalize
                    else f"{counts[row, column]}"
                )
                level = shown[row, column] / (1.0 if normalize else max(shown.max(), 1))
                axis.text(
                    column, row, text, ha="center", va="center", fontsize=8,
                    color="black" if level > 0.6 else "white",
                )  # fmt: skip
    heading = "confusion matrix" + (" (row-normalised)" if normalize else "")
    axis.set_title(f"{title}: {heading}" if title else heading)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _per_class_metric(report: Mapping[str, Any], metric: str | None) -> tuple[str, str | None]:
    rows = list(report["per_class"].values())
    keys = {key for row in rows for key in row}
    if metric is None:
        for default_metric, count_key in _PER_CLASS_DEFAULTS.values():
            if default_metric in keys:
                return default_metric, count_key
        raise ValueError(
            f"plot_per_class: cannot tell the task of the report (per-class keys {sorted(keys)}); pass metric="
        )
    if metric not in keys:
        numeric = sorted(
            key
            for key in keys
            if any(isinstance(row.get(key), float) for row in rows) and key not in _COUNT_KEYS
        )
        raise ValueError(f"plot_per_class: no per-class '{metric}' in the report; available: {numeric}")
    return metric, next((key for key in _COUNT_KEYS if key in keys), None)


def per_class_rows(
    report: Mapping[str, Any], metric: str | None = None
) -> tuple[str, str | None, list[tuple[str, float | None, int | None]]]:
    """The rows [`plot_per_class`] draws: `(metric, count key, [(class name, value or None, count), ...])`.

    Classes with a value come first, best first (ties keep the report's order); classes whose value is
    undefined (None / NaN: no samples) follow in report order with `None`. See [`plot_per_class`] for `metric`.
    """
    _check_report(report, "plot_per_class")
    if not report["per_class"]:
        raise ValueError("plot_per_class: the report has no per-class rows")
    metric, count_key = _per_class_metric(report, metric)
    rows = []
    for name, row in report["per_class"].items():
        value = row.get(metric)
        value = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
        rows.append((name, value, row.get(count_key) if count_key else None))
    defined = sorted((row for row in rows if row[1] is not None), key=lambda row: -row[1])
    return metric, count_key, defined + [row for row in rows if row[1] is None]


def plot_per_class(
    report: Mapping[str, Any],
    path: str | os.PathLike,
    metric: str | None = None,
    *,
    title: str | None = None,
) -> Path:
    """Draw a horizontal bar chart of one per-class metric of a report, best class on top, as a PNG.

    `metric` defaults to the task's headline per-class value: classification `acc@1`, detection `AP`,
    segmentation `IoU`. Each bar is labelled with its percentage and the class's count (samples, ground-truth
    boxes or ground-truth pixels); classes where the metric is undefined (no samples) are listed at the bottom as
    "n/a" rather than dropped. A dashed line marks the mean over the classes that have a value.

    Raises:
        ValueError: the report has no per-class rows, or not the requested metric.
    """
    metric, count_key, ordered = per_class_rows(report, metric)
    defined = [row for row in ordered if row[1] is not None]

    figure = _figure(9.0, float(np.clip(0.26 * len(ordered) + 1.6, 3.0, 60.0)))
    axis = figure.add_subplot()
    positions = np.arange(len(ordered))
    values = [100.0 * value if value is not None else 0.0 for _, value, _ in ordered]
    axis.barh(positions, values, color=_BAR_COLOR, height=0.7)
    axis.set_yticks(positions, [name for name, _, _ in ordered], fontsize=9 if len(ordered) <= 40 else 7)
    axis.invert_yaxis()
    axis.set_xlim(0, 118)  # room for the value labels right of a 100% bar
    axis.set_xticks(range(0, 101, 20))
    axis.set_xlabel(f"{metric} (%)")
    count_name = {"support": "n", "num_ground_truth": "boxes", "gt_pixels": "px"}.get(count_key, "n")
    for position, (_, value, count) in zip(positions, ordered):
        shown = f"{100.0 * value:.1f}%" if value is not None else "n/a"
        if count is not None:
            shown += f" ({count_name}={count})"
        axis.text(
            (100.0 * value if value is not None else 0.0) + 1.0, position, shown, va="center", fontsize=8
        )
    if defined:
        mean = 100.0 * float(np.mean([value for _, value, _ in defined]))
        axis.axvline(mean, color="#D55E00", linestyle="--", linewidth=1.2, label=f"class mean {mean:.1f}%")
        axis.legend(loc="lower right", fontsize=8)
    heading = f"per-class {metric}"
    axis.set_title(f"{title}: {heading}" if title else heading)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _safe_file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@+-]+", "_", name).strip("._") or "config"


def plot_evaluation(eval_results_json: str | os.PathLike, output_dir: str | os.PathLike) -> list[Path]:
    """Per-class bars and (except for detection) a confusion matrix for every config of an eval results file.

    `eval_results_json` is what `train_accelerate.py` and the evaluation command write: `{"results": {config:
    {"task", "split", "metrics", "report"}}}`. Writes `<config>_per_class.png` and `<config>_confusion_matrix.png`
    into `output_dir` and returns their paths. Configs without a report are skipped with a warning.

    Raises:
        FileNotFoundError / ValueError: the file is missing, is not JSON, or holds no plottable result.
    """
    source = Path(eval_results_json)
    try:
        data = json.loads(source.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"plot_evaluation: {source} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"plot_evaluation: {source} is not valid JSON ({error})") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not results:
        raise ValueError(f"plot_evaluation: {source} has no 'results' mapping of config -> result")
    output_dir = Path(output_dir)
    written: list[Path] = []
    skipped: list[str] = []
    stems: set[str] = set()
    for config, result in tqdm(results.items(), desc="plotting evaluation", unit="config"):
        report = result.get("report") if isinstance(result, dict) else None
        if not isinstance(report, dict) or not report.get("per_class"):
            skipped.append(config)
            continue
        stem = _safe_file_stem(config)
        while stem in stems:
            stem += "_"
        stems.add(stem)
        task = result.get("task")
        split = result.get("split")
        title = f"{config} ({split})" if split and f"@{split}" not in config else config
        metric = _PER_CLASS_DEFAULTS[task][0] if task in _PER_CLASS_DEFAULTS else None
        try:
            written.append(plot_per_class(report, output_dir / f"{stem}_per_class.png", metric, title=title))
            if report.get("confusion_matrix") is not None:
                written.append(
                    plot_confusion_matrix(report, output_dir / f"{stem}_confusion_matrix.png", title=title)
                )
        except ValueError as error:
            raise ValueError(f"plot_evaluation: {source}, config {config!r}: {error}") from None
    if skipped:
        logger.warning(
            "plot_evaluation: %d of %d configs in %s have no per-class report and were not plotted: %s",
            len(skipped),
            len(results),
            source,
            ", ".join(skipped),
        )
    if not written:
        raise ValueError(f"plot_evaluation: no config in {source} has a per-class report to plot")
    return written
