"""Small array helpers shared by the procedural surfaces, the synthetic defects and the converters.

Everything works on ``float32`` arrays in ``[0, 1]`` (images ``H x W x 3``, fields ``H x W``) and takes an
explicit ``numpy.random.Generator``, so results are reproducible from a seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # anti-aliasing factor for drawn strokes


def gaussian_blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D (or H x W x C) float array with reflected borders."""
    if sigma <= 0:
        return field.astype(np.float32, copy=True)
    radius = max(1, int(3.0 * sigma + 0.5))
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    out = field.astype(np.float32, copy=False)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        # Reflect needs a dimension larger than the radius; fall back to edge padding on tiny inputs.
        mode = "reflect" if out.shape[axis] > radius else "edge"
        padded = np.pad(out, pad, mode=mode)
        windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=axis)
        out = windows @ kernel
    return out.astype(np.float32, copy=False)


def value_noise(height: int, width: int, rng: np.random.Generator, cells: float) -> np.ndarray:
    """Smooth noise in ``[0, 1]`` with about ``cells`` random control points along the longer side."""
    scale = max(height, width) / max(cells, 1.0)
    grid_h = max(2, int(np.ceil(height / scale)) + 1)
    grid_w = max(2, int(np.ceil(width / scale)) + 1)
    grid = rng.random((grid_h, grid_w), dtype=np.float32)
    field = np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.BICUBIC))
    return np.clip(field, 0.0, 1.0)


def fractal_noise(
    height: int, width: int, rng: np.random.Generator, base_cells: float = 4.0, octaves: int = 4
) -> np.ndarray:
    """Sum of ``octaves`` value-noise layers (each twice as fine, half as strong), normalised to ``[0, 1]``."""
    total = np.zeros((height, width), np.float32)
    weight_sum = 0.0
    for octave in range(octaves):
        weight = 0.5**octave
        total += weight * value_noise(height, width, rng, base_cells * 2**octave)
        weight_sum += weight
    total /= weight_sum
    low, high = float(total.min()), float(total.max())
    return (total - low) / max(high - low, 1e-6)


def draw_strokes(
    height: int,
    width: int,
    polylines: Sequence[Sequence[tuple[float, float]]],
    widths: Sequence[float],
) -> np.ndarray:
    """Anti-aliased coverage in ``[0, 1]`` of polylines (points in pixel coordinates) of the given widths."""
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for points, stroke in zip(polylines, widths):
        scaled = [(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in points]
        line_width = max(1, round(stroke * SUPERSAMPLE))
        draw.line(scaled, fill=255, width=line_width, joint="curve")
        # Round caps so short segments do not end in square notches.
        radius = line_width / 2
        for x, y in (scaled[0], scaled[-1]):
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    small = canvas.resize((width, height), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def draw_polygons(height: int, width: int, polygons: Sequence[Sequence[tuple[float, float]]]) -> np.ndarray:
    """Anti-aliased coverage in ``[0, 1]`` of filled polygons."""
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        draw.polygon([(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in polygon], fill=255)
    small = canvas.resize((width, height), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def ellipse_field(
    height: int, width: int, center: tuple[float, float], radii: tuple[float, float], angle: float = 0.0
) -> np.ndarray:
    """Normalised elliptic distance: 0 at ``center``, 1 on the ellipse with ``radii`` rotated by ``angle``."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = xs + 0.5 - center[0], ys + 0.5 - center[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dx * cos + dy * sin) / max(radii[0], 1e-3)
    v = (-dx * sin + dy * cos) / max(radii[1], 1e-3)
    return np.sqrt(u * u + v * v)


def bbox_of_mask(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight COCO ``(x, y, w, h)`` box of the true pixels of a boolean mask, ``None`` when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    return (float(x0), float(y0), float(x1 - x0), float(y1 - y0))


def mask_values(mask: np.ndarray) -> list[int]:
    """Sorted distinct values of a uint8 mask (a histogram: several times faster than ``np.unique``)."""
    return np.flatnonzero(np.bincount(mask.ravel(), minlength=256)).tolist()


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def luminance(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114], np.float32)
