"""Procedural normal surfaces for the demo dataset: painted panel, machined metal and woven fabric.

Each generator returns a ``uint8`` H x W x 3 image that looks like a defect-free close-up of the surface
kind the taxonomy assigns to a domain (``surface:`` in ``taxonomy.yaml``), with lighting gradients and
fine texture so the defects have something realistic to blend into.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .raster import fractal_noise, gaussian_blur, to_uint8, value_noise

# Common car paint colours (RGB 0-1): white, silver, black, grey, red, blue, dark green, beige.
PAINT_COLORS = np.array(
    [
        [0.88, 0.88, 0.86],
        [0.70, 0.72, 0.74],
        [0.10, 0.10, 0.11],
        [0.42, 0.43, 0.45],
        [0.62, 0.08, 0.08],
        [0.12, 0.24, 0.52],
        [0.10, 0.30, 0.20],
        [0.76, 0.70, 0.58],
    ],
    np.float32,
)
FABRIC_COLORS = np.array(
    [[0.20, 0.20, 0.22], [0.45, 0.42, 0.38], [0.62, 0.57, 0.48], [0.30, 0.26, 0.22], [0.14, 0.16, 0.22]],
    np.float32,
)


def _lighting(h: int, w: int, rng: np.random.Generator, strength: float) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = float(rng.uniform(0, 2 * np.pi))
    ramp = (xs / w - 0.5) * np.cos(angle) + (ys / h - 0.5) * np.sin(angle)
    return 1.0 + strength * ramp + 0.5 * strength * (value_noise(h, w, rng, 2.5) - 0.5)


def painted_panel(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Glossy car paint: base colour, broad lighting, a soft specular band and orange-peel texture."""
    color = PAINT_COLORS[rng.integers(len(PAINT_COLORS))] * float(rng.uniform(0.9, 1.05))
    image = np.broadcast_to(color, (h, w, 3)) * _lighting(h, w, rng, 0.35)[..., None]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = float(rng.uniform(-0.8, 0.8))
    offset = float(rng.uniform(0.2, 0.8))
    band = (xs / w) * np.cos(angle) + (ys / h) * np.sin(angle) - offset
    specular = np.exp(-((band / float(rng.uniform(0.06, 0.14))) ** 2)) * float(rng.uniform(0.15, 0.35))
    peel = (fractal_noise(h, w, rng, base_cells=max(h, w) / 3.0, octaves=2) - 0.5) * 0.04
    return to_uint8(image + specular[..., None] + peel[..., None])


def _streaks(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Brushing marks along the rows: one random value per row plus fine noise, centred on 0."""
    rows = rng.random((h, 1), dtype=np.float32) * np.ones((1, w), np.float32)
    return gaussian_blur(rows + 0.3 * rng.random((h, w), dtype=np.float32), 0.8) - 0.5


def machined_metal(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Brushed or cast metal: grey with a slight tint, directional streaks, grime and lighting."""
    grey = float(rng.uniform(0.35, 0.7))
    tint = np.array([1.0, 1.0, 1.0], np.float32) + rng.normal(0, 0.04, 3).astype(np.float32)
    streaks = _streaks(h, w, rng) if rng.random() < 0.5 else _streaks(w, h, rng).T
    grime = fractal_noise(h, w, rng, base_cells=4.0, octaves=3)
    image = grey * tint * _lighting(h, w, rng, 0.45)[..., None]
    image = image * (1.0 + 0.12 * streaks[..., None]) * (0.85 + 0.2 * grime[..., None])
    return to_uint8(image)


def woven_fabric(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Upholstery: a coloured weave (two crossing sinusoids), fibre noise and soft folds."""
    color = FABRIC_COLORS[rng.integers(len(FABRIC_COLORS))] * float(rng.uniform(0.9, 1.1))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    period = float(rng.uniform(3.0, 5.0))
    weave = 0.5 + 0.25 * (np.sin(2 * np.pi * xs / period) + np.sin(2 * np.pi * ys / period))
    fibres = rng.random((h, w), dtype=np.float32)
    folds = value_noise(h, w, rng, 3.0)
    shade = (0.8 + 0.2 * weave) * (0.9 + 0.2 * fibres) * (0.8 + 0.35 * folds) * _lighting(h, w, rng, 0.25)
    return to_uint8(color * shade[..., None])


SURFACES: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "panel": painted_panel,
    "metal": machined_metal,
    "fabric": woven_fabric,
}


def make_surface(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A normal ``kind`` surface (``panel``, ``metal`` or ``fabric``) of ``h x w`` pixels."""
    try:
        return SURFACES[kind](h, w, rng)
    except KeyError:
        raise ValueError(f"unknown surface {kind!r}; known: {sorted(SURFACES)}") from None
