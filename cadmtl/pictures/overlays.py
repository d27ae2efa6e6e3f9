"""Drawing CadMtl predictions on an image, with one fixed colour-blind-friendly palette.

[`draw_predictions`] draws an [`ImagePrediction`] on a PIL image: the segmentation mask as a translucent colour
layer (background left clear) with a legend of the classes present, the detection boxes tagged "label score", and
the top classes in a corner banner. Colours come from [`class_color`]: Okabe-Ito first, then tab20 without its
greys, then evenly spread hues. A detection class and a segmentation class with the same name share a colour
([`task_colors`]), so a "dent" box and a "dent" mask look alike. Running a model on files is
`cadmtl.pictures.predict`; evaluation charts are `cadmtl.pictures.charts`.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ["Color", "ImagePrediction", "class_color", "draw_anomaly_map", "draw_predictions", "task_colors"]

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


def draw_anomaly_map(
    image: Image.Image,
    anomaly_map: np.ndarray,
    value_range: tuple[float, float],
    *,
    true_mask: np.ndarray | None = None,
    predicted_mask: np.ndarray | None = None,
    alpha: float = 0.5,
    colormap: str = "inferno",
) -> Image.Image:
    """A heat map of `anomaly_map` (H, W) blended over `image`, with defect contours.

    The colours span the fixed `value_range` (e.g. 0 to twice the model's pixel threshold), never the map's own
    minimum and maximum: a normal image must look normal. `true_mask` (0 / 1 / 255) is outlined in white, the
    thresholded `predicted_mask` in cyan.
    """
    from matplotlib import colormaps

    if anomaly_map.shape != (image.height, image.width):
        raise ValueError(
            f"anomaly map {anomaly_map.shape} does not match the image size {(image.height, image.width)}"
        )
    low, high = value_range
    scaled = np.clip((np.asarray(anomaly_map, dtype=np.float32) - low) / max(high - low, 1e-12), 0.0, 1.0)
    heat = (colormaps[colormap](scaled)[..., :3] * 255).astype(np.uint8)
    canvas = Image.blend(image.convert("RGB"), Image.fromarray(heat), alpha)
    for mask, colour in ((true_mask, (255, 255, 255)), (predicted_mask, (0, 255, 255))):
        if mask is not None and (np.asarray(mask) == 1).any():
            region = (np.asarray(mask) == 1).astype(np.uint8) * 255
            grown = Image.fromarray(region).filter(ImageFilter.MaxFilter(3))
            edge = (np.asarray(grown) > 0) & ~(region > 0)
            pixels = np.asarray(canvas).copy()
            pixels[edge] = colour
            canvas = Image.fromarray(pixels)
    return canvas
