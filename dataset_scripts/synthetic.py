"""Procedural synthetic defects composited onto normal images (the paper's long-tail augmentation).

Each style paints one defect into a window around a centre and returns the exact mask of the pixels it
changed visibly (coverage >= 0.5 for painted styles, deformation height >= 10 % for dents and bulges), so
the mask, the tight box and the image always agree. Blending follows the local lighting of the normal
image (defect colours are scaled by the blurred local luminance), edges are soft (anti-aliased, blurred
coverage) and painted materials carry their own fine texture.

>>> rng = np.random.default_rng(0)
>>> normal = np.full((96, 128, 3), 120, np.uint8)
>>> defect = synthesize_defect(normal, "scratch", rng)
>>> defect.mask.any() and defect.bbox == bbox_of_mask(defect.mask)
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .raster import (
    bbox_of_mask,
    draw_polygons,
    draw_strokes,
    ellipse_field,
    fractal_noise,
    gaussian_blur,
    luminance,
    to_float,
    to_uint8,
)
from .taxonomy import SYNTHESIS_STYLES

Color = tuple[float, float, float]
StyleFn = Callable[[np.ndarray, np.random.Generator, float, float, float, "Color | None"], tuple]


@dataclass
class SyntheticDefect:
    """One composited defect: the new image, its exact mask and tight COCO box, and what produced it."""

    image: np.ndarray  # uint8 H x W x 3, the normal image with the defect
    mask: np.ndarray  # bool H x W, the pixels the defect changed
    bbox: tuple[float, float, float, float]  # tight (x, y, w, h) of ``mask``
    style: str
    anomaly: str | None = None


@dataclass
class DefectSpec:
    """What to paint: a style, the anomaly it stands for, an optional RGB tint (0-255)."""

    style: str
    anomaly: str | None = None
    color: tuple[int, int, int] | None = None


@dataclass
class PlacedDefect:
    anomaly: str | None
    style: str
    mask: np.ndarray
    bbox: tuple[float, float, float, float]
    area: int = field(init=False)

    def __post_init__(self) -> None:
        self.area = int(self.mask.sum())


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / max(edge1 - edge0, 1e-6), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _local_light(patch: np.ndarray, radius: float) -> np.ndarray:
    """Local brightness relative to the window mean, so painted materials follow the scene lighting."""
    light = gaussian_blur(luminance(patch), max(radius / 3.0, 1.0))
    return np.clip(light / max(float(light.mean()), 1e-3), 0.6, 1.4)[..., None]


def _blend(patch: np.ndarray, material: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    alpha = alpha[..., None]
    return patch * (1.0 - alpha) + material * alpha


def _tint(color: Color | None, default: Color) -> np.ndarray:
    return np.array(color if color is not None else default, np.float32)


def _blob(
    h: int, w: int, rng: np.random.Generator, cx: float, cy: float, r: float, roughness: float
) -> np.ndarray:
    """Irregular soft blob field: > 0.5 inside; ``roughness`` sets how ragged the border is."""
    angle = float(rng.uniform(0, np.pi))
    radii = (r, r * float(rng.uniform(0.6, 1.0)))
    dist = ellipse_field(h, w, (cx, cy), radii, angle)
    noise = fractal_noise(h, w, rng, base_cells=max(3.0, max(h, w) / max(r, 1.0) * 2.0), octaves=4)
    return (1.0 - dist) + roughness * (noise - 0.5) + 0.5 - 0.35


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int = 24) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    return [(float(x), float(y)) for x, y in points]


# ------------------------------------------------------------------------------------------ styles
# Each style takes (patch, rng, cx, cy, r, color) with the defect centred at (cx, cy) in patch coordinates
# and radius r, and returns (new_patch, mask).


def _scratch(patch, rng, cx, cy, r, color):
    h, w = patch.shape[:2]
    lines, widths = [], []
    base_angle = float(rng.uniform(0, np.pi))
    for _ in range(int(rng.integers(1, 4))):
        angle = base_angle + float(rng.normal(0, 0.25))
        direction = np.array([np.cos(angle), np.sin(angle)], np.float32)
        normal = np.array([-direction[1], direction[0]], np.float32)
        offset = normal * float(rng.uniform(-0.4, 0.4)) * r
        center = np.array([cx, cy], np.float32) + offset
        p0, p2 = center - direction * r, center + direction * r
        p1 = center + normal * float(rng.uniform(-0.3, 0.3)) * r
        lines.append(_bezier(p0, p1, p2))
        widths.append(float(rng.uniform(1.5, 2.5)) * max(1.0, r / 40.0))
    coverage = draw_strokes(h, w, lines, widths)
    shadow = np.roll(coverage, (1, 1), axis=(0, 1))
    if color is None and rng.random() < 0.7:
        material = patch + (1.0 - patch) * 0.65  # exposed clear coat catches the light
    else:
        material = np.broadcast_to(_tint(color, (0.28, 0.28, 0.3)), patch.shape) * _local_light(patch, r)
    out = patch * (1.0 - 0.25 * shadow[..., None] * (1.0 - coverage[..., None]))
    out = _blend(out, material, coverage)
    return out, coverage >= 0.5


def _deformation(patch, rng, cx, cy, r, sign):
    h, w = patch.shape[:2]
    angle = float(rng.uniform(0, np.pi))
    dist = ellipse_field(h, w, (cx, cy), (r, r * float(rng.uniform(0.65, 1.0))), angle)
    height = sign * 0.5 * (np.cos(np.pi * np.clip(dist, 0.0, 1.0)) + 1.0)
    gy, gx = np.gradient(height * r)
    # Reflections on a glossy surface bend with the surface normal: resample the patch along the gradient.
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    sx = np.clip(xs + 0.35 * gx * r / 4.0, 0, w - 1).round().astype(np.intp)
    sy = np.clip(ys + 0.35 * gy * r / 4.0, 0, h - 1).round().astype(np.intp)
    warped = patch[sy, sx]
    light_dir = np.array([-0.6, -0.8], np.float32)
    slope = (gx * light_dir[0] + gy * light_dir[1]) / max(np.abs(gx).max() + np.abs(gy).max(), 1e-6)
    shading = 1.0 + 1.1 * slope
    rim = np.exp(-(((dist - 0.9) / 0.08) ** 2))  # a thin highlight where the surface turns
    out = warped * shading[..., None] + 0.25 * rim[..., None] * (sign > 0)
    out = out * (1.0 - 0.12 * np.abs(height))[..., None]
    return out, np.abs(height) >= 0.1


def _dent(patch, rng, cx, cy, r, color):
    return _deformation(patch, rng, cx, cy, r, -1.0)


def _bulge(patch, rng, cx, cy, r, color):
    out, mask = _deformation(patch, rng, cx, cy, r, 1.0)
    if color is not None:
        out = _blend(out, out * _tint(color, (1, 1, 1)), mask.astype(np.float32) * 0.4)
    return out, mask


def _crack(patch, rng, cx, cy, r, color):
    h, w = patch.shape[:2]
    lines, widths = [], []

    def walk(start: np.ndarray, angle: float, length: float) -> list[tuple[float, float]]:
        points = [start.copy()]
        step = max(r / 7.0, 1.5)
        for _ in range(max(2, int(length / step))):
            angle += float(rng.normal(0, 0.45))
            points.append(points[-1] + step * np.array([np.cos(angle), np.sin(angle)], np.float32))
        return [(float(x), float(y)) for x, y in points]

    angle = float(rng.uniform(0, 2 * np.pi))
    start = np.array([cx, cy], np.float32) - r * np.array([np.cos(angle), np.sin(angle)], np.float32)
    trunk = walk(start, angle, 2.0 * r)
    base_width = float(rng.uniform(1.6, 2.4)) * max(1.0, r / 45.0)
    lines.append(trunk)
    widths.append(base_width)
    for _ in range(int(rng.integers(1, 4))):
        origin = np.array(trunk[int(rng.integers(1, len(trunk) - 1))], np.float32)
        lines.append(walk(origin, angle + float(rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)), r * 0.7))
        widths.append(base_width * 0.8)
    coverage = draw_strokes(h, w, lines, widths)
    halo = draw_strokes(h, w, lines, [wd + 2.0 for wd in widths])
    material = np.broadcast_to(_tint(color, (0.06, 0.06, 0.07)), patch.shape)
    out = _blend(patch, patch + (1.0 - patch) * 0.5, 0.35 * halo * (1.0 - coverage))
    out = _blend(out, material, coverage)
    return out, coverage >= 0.5


def _corrosion(patch, rng, cx, cy, r, color):
    h, w = patch.shape[:2]
    field_ = _blob(h, w, rng, cx, cy, r, roughness=1.1)
    alpha = _smoothstep(0.45, 0.55, field_)
    halo = gaussian_blur(alpha, r / 5.0) * (1.0 - alpha)
    mix = fractal_noise(h, w, rng, base_cells=max(h, w) / 3.0, octaves=2)[..., None]
    dark = np.array([0.30, 0.13, 0.05], np.float32)
    bright = _tint(color, (0.74, 0.35, 0.10))
    material = (dark * (1 - mix) + bright * mix) * _local_light(patch, r)
    pits = (fractal_noise(h, w, rng, base_cells=max(h, w) / 2.0, octaves=1) > 0.8)[..., None]
    material = np.where(pits, material * 0.45, material)
    out = _blend(patch, patch * np.array([1.0, 0.8, 0.6], np.float32), 0.5 * halo)
    out = _blend(out, material, alpha)
    return out, alpha >= 0.5


def _paint_peel(patch, rng, cx, cy, r, color):
    h, w = patch.shape[:2]
    field_ = _blob(h, w, rng, cx, cy, r, roughness=0.7)
    alpha = _smoothstep(0.47, 0.53, field_)
    grey = float(rng.uniform(0.55, 0.72))
    # Sanding marks: noise stretched 8x along x.
    streaks = np.repeat(fractal_noise(h, -(-w // 8), rng, base_cells=h / 2.0, octaves=2), 8, axis=1)[:, :w]
    primer = _tint(color, (grey, grey, grey * 1.03)) * (0.9 + 0.2 * streaks[..., None])
    material = primer * _local_light(patch, r)
    rim = np.clip(gaussian_blur(alpha, 1.2) - alpha, 0.0, 1.0) * 2.0
    shadow = np.roll(alpha, (1, 1), axis=(0, 1)) * (1.0 - alpha)
    out = patch * (1.0 - 0.35 * shadow[..., None])
    out = _blend(out, patch + (1.0 - patch) * 0.6, np.clip(rim, 0.0, 1.0))
    out = _blend(out, material, alpha)
    return out, alpha >= 0.5


def _missing_part(patch, rng, cx, cy, r, color):
    h, w = patch.shape[:2]
    half_w, half_h = r * float(rng.uniform(0.75, 1.0)), r * float(rng.uniform(0.5, 0.8))
    corner = min(half_w, half_h) * 0.35
    # Rounded rectangle as a polygon (corners sampled on quarter circles).
    polygon = []
    for qx, qy, a0 in ((1, 1, 0.0), (-1, 1, 0.5), (-1, -1, 1.0), (1, -1, 1.5)):
        ox, oy = cx + qx * (half_w - corner), cy + qy * (half_h - corner)
        for t in np.linspace(a0 * np.pi, (a0 + 0.5) * np.pi, 6):
            polygon.append((float(ox + corner * np.cos(t)), float(oy + corner * np.sin(t))))
    coverage = draw_polygons(h, w, [polygon])
    ys = np.mgrid[0:h, 0:w][0].astype(np.float32)
    depth = np.clip((ys - (cy - half_h)) / max(2 * half_h, 1.0), 0.0, 1.0)[..., None]
    material = _tint(color, (0.05, 0.05, 0.06)) + 0.12 * depth
    holes = [
        (cx + float(rng.uniform(-0.5, 0.5)) * half_w, cy + float(rng.uniform(-0.4, 0.4)) * half_h)
        for _ in range(int(rng.integers(1, 3)))
    ]
    hole_cov = np.zeros((h, w), np.float32)
    for hx, hy in holes:
        hole_cov = np.maximum(
            hole_cov, 1.0 - _smoothstep(0.8, 1.0, ellipse_field(h, w, (hx, hy), (r * 0.12,) * 2))
        )
    material = material * (1.0 - 0.8 * hole_cov[..., None])
    out = _blend(patch, material, coverage)
    return out, coverage >= 0.5


def _stain(patch, rng, cx, cy, r, color):
    h, w = patch.shape[:2]
    field_ = _blob(h, w, rng, cx, cy, r, roughness=0.5)
    inside = _smoothstep(0.44, 0.56, field_)
    ring = np.exp(-(((field_ - 0.52) / 0.05) ** 2))
    tint = _tint(color, (0.35, 0.24, 0.14))
    material = tint * _local_light(patch, r) * (1.0 - 0.35 * ring[..., None])
    alpha = np.clip(0.82 * inside + 0.15 * ring, 0.0, 1.0)
    out = _blend(patch, material, alpha)
    gloss = np.exp(-(ellipse_field(h, w, (cx - r * 0.3, cy - r * 0.3), (r * 0.25, r * 0.12), 0.6) ** 2) * 3.0)
    out = out + 0.35 * (gloss * inside)[..., None]
    return out, alpha >= 0.5


def _burn(patch, rng, cx, cy, r, color):
    h, w = patch.shape[:2]
    field_ = _blob(h, w, rng, cx, cy, r, roughness=0.6)
    # Radial bands inside the blob: black core, brown char, a faint yellow scorch at the edge.
    core = _smoothstep(0.75, 0.9, field_)
    char = _smoothstep(0.47, 0.55, field_)
    scorch = _smoothstep(0.3, 0.47, field_) * (1.0 - char)
    brown = _tint(color, (0.30, 0.16, 0.07))
    material = brown * (1.0 - core[..., None]) + np.float32(0.03) * core[..., None]
    out = _blend(patch, patch * np.array([0.9, 0.75, 0.45], np.float32), 0.6 * scorch)
    out = _blend(out, material * _local_light(patch, r), char)
    return out, char >= 0.5


def _tear(patch, rng, cx, cy, r, color):
    h, w = patch.shape[:2]
    angle = float(rng.uniform(0, np.pi))
    direction = np.array([np.cos(angle), np.sin(angle)], np.float32)
    normal = np.array([-direction[1], direction[0]], np.float32)
    n = 14
    t = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    jag = rng.normal(0, 0.12, n).astype(np.float32) * r
    jag[0] = jag[-1] = 0.0
    spine = np.array([cx, cy], np.float32) + t[:, None] * r * direction + jag[:, None] * normal
    half = (1.0 - t**2) * r * float(rng.uniform(0.18, 0.28)) + 0.8
    left = spine + half[:, None] * normal
    right = spine - half[:, None] * normal
    polygon = [(float(x), float(y)) for x, y in np.concatenate([left, right[::-1]])]
    coverage = draw_polygons(h, w, [polygon])
    foam = _tint(color, (0.78, 0.68, 0.40))
    depth = gaussian_blur(coverage, max(r / 10.0, 0.8))
    material = foam * (0.35 + 0.65 * (1.0 - depth[..., None])) * 0.6
    fibres = []
    for k in range(1, n - 1):
        for side in (1.0, -1.0):
            root = spine[k] + side * half[k] * normal
            tip = root + side * normal * float(rng.uniform(1.0, 3.0)) + direction * float(rng.normal(0, 1.5))
            fibres.append([(float(root[0]), float(root[1])), (float(tip[0]), float(tip[1]))])
    fibre_cov = draw_strokes(h, w, fibres, [1.0] * len(fibres)) * (1.0 - coverage)
    out = _blend(patch, patch + (1.0 - patch) * 0.4, 0.6 * fibre_cov)
    out = _blend(out, material, coverage)
    return out, coverage >= 0.5


STYLES: dict[str, StyleFn] = {
    "scratch": _scratch,
    "dent": _dent,
    "crack": _crack,
    "corrosion": _corrosion,
    "paint_peel": _paint_peel,
    "missing_part": _missing_part,
    "stain": _stain,
    "burn": _burn,
    "tear": _tear,
    "bulge": _bulge,
}
assert set(STYLES) == set(SYNTHESIS_STYLES), "taxonomy.SYNTHESIS_STYLES and synthetic.STYLES disagree"


def _as_float_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {image.shape}")
    return to_float(image) if image.dtype == np.uint8 else image.astype(np.float32)


def paint_defect(
    image: np.ndarray,
    style: str,
    rng: np.random.Generator,
    center: tuple[float, float],
    radius: float,
    color: tuple[int, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect into a float RGB image in place of a window; returns ``(image, full-size mask)``."""
    if style not in STYLES:
        raise ValueError(f"unknown synthesis style {style!r}; known: {sorted(STYLES)}")
    if radius < 3:
        raise ValueError(f"defect radius {radius:.1f} px is too small to draw (need >= 3)")
    h, w = image.shape[:2]
    margin = int(np.ceil(radius * 2.2)) + 4  # cracks and scratches wander past the radius
    x0, x1 = max(0, int(center[0]) - margin), min(w, int(center[0]) + margin)
    y0, y1 = max(0, int(center[1]) - margin), min(h, int(center[1]) + margin)
    patch = image[y0:y1, x0:x1]
    tint = tuple(c / 255.0 for c in color) if color is not None else None
    new_patch, patch_mask = STYLES[style](patch, rng, center[0] - x0, center[1] - y0, radius, tint)
    out = image.copy()
    out[y0:y1, x0:x1] = np.clip(new_patch, 0.0, 1.0)
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = patch_mask
    return out, mask


def synthesize_defect(
    normal: np.ndarray,
    style: str,
    rng: np.random.Generator,
    *,
    center: tuple[float, float] | None = None,
    radius: float | None = None,
    color: tuple[int, int, int] | None = None,
    anomaly: str | None = None,
) -> SyntheticDefect:
    """Composite one ``style`` defect onto ``normal`` (uint8 RGB); random placement unless given."""
    base = _as_float_rgb(normal)
    h, w = base.shape[:2]
    if radius is None:
        radius = float(rng.uniform(0.12, 0.22)) * min(h, w)
    if center is None:
        center = (float(rng.uniform(radius, w - radius)), float(rng.uniform(radius, h - radius)))
    image, mask = paint_defect(base, style, rng, center, radius, color)
    bbox = bbox_of_mask(mask)
    if bbox is None:
        raise RuntimeError(f"style {style!r} produced an empty mask at {center} r={radius:.1f}")
    return SyntheticDefect(to_uint8(image), mask, bbox, style, anomaly)


def _overlaps(
    box: tuple[float, float, float, float], others: Sequence[tuple[float, float, float, float]]
) -> bool:
    x, y, w, h = box
    return any(x < ox + ow and ox < x + w and y < oy + oh and oy < y + h for ox, oy, ow, oh in others)


def place_defects(
    normal: np.ndarray,
    specs: Sequence[DefectSpec],
    rng: np.random.Generator,
    *,
    radius_range: tuple[float, float] = (0.12, 0.22),
    attempts: int = 25,
    region: np.ndarray | None = None,
) -> tuple[np.ndarray, list[PlacedDefect]]:
    """Paint several defects without overlapping boxes; later defects win where masks still touch.

    ``radius_range`` is relative to the shorter image side. ``region`` (bool H x W, optional) is where defect
    centres may fall, e.g. the car in a street photo; without it they fall anywhere. A defect that finds no
    free place after ``attempts`` tries is left out, so the result can hold fewer defects than ``specs``.
    """
    image = _as_float_rgb(normal)
    h, w = image.shape[:2]
    if region is not None:
        if region.shape != (h, w):
            raise ValueError(f"region of shape {region.shape} does not match the {h}x{w} image")
        region_ys, region_xs = np.nonzero(region)
    placed: list[tuple[DefectSpec, np.ndarray]] = []
    taken: list[tuple[float, float, float, float]] = []
    for spec in specs:
        for _ in range(attempts):
            radius = float(rng.uniform(*radius_range)) * min(h, w)
            margin = radius * 1.05
            if 2 * margin >= min(h, w):
                radius = min(h, w) / 2.2
                margin = radius * 1.05
            if region is None:
                center = (float(rng.uniform(margin, w - margin)), float(rng.uniform(margin, h - margin)))
            else:  # a region pixel far enough from the image edges
                inside = np.flatnonzero(
                    (region_xs + 0.5 >= margin)
                    & (region_xs + 0.5 <= w - margin)
                    & (region_ys + 0.5 >= margin)
                    & (region_ys + 0.5 <= h - margin)
                )
                if not inside.size:
                    continue
                pick = int(inside[rng.integers(inside.size)])
                center = (float(region_xs[pick]) + 0.5, float(region_ys[pick]) + 0.5)
            footprint = (center[0] - margin, center[1] - margin, 2 * margin, 2 * margin)
            if not _overlaps(footprint, taken):
                break
        else:
            continue
        image, mask = paint_defect(image, spec.style, rng, center, radius, spec.color)
        if not mask.any():
            continue
        taken.append(footprint)
        placed.append((spec, mask))
    results: list[PlacedDefect] = []
    for index, (spec, mask) in enumerate(placed):
        visible = mask.copy()
        for _, later in placed[index + 1 :]:
            visible &= ~later
        bbox = bbox_of_mask(visible)
        if bbox is not None:
            results.append(PlacedDefect(spec.anomaly, spec.style, visible, bbox))
    return to_uint8(image), results
