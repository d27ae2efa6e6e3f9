"""Box geometry on plain Python floats, for rewards scored one completion at a time.

Boxes are ``(x1, y1, x2, y2)`` in the answer's coordinates (Qwen2-VL: 0-1000 normalised; Qwen2.5-VL: pixels).
``torchvision.ops.box_iou`` computes the same IoU for (N, 4) x (M, 4) tensors; a reward sees one or a few
boxes per completion, where building tensors costs more than the arithmetic, so these helpers stay scalar
(``tests/reference/test_rewards.py`` checks them against torchvision).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Box = tuple[float, float, float, float]

ZERO_BOX: Box = (0.0, 0.0, 0.0, 0.0)


def as_box(values: Sequence[float]) -> Box:
    """Four numbers (list, tuple, tensor) as a :data:`Box` of floats, or a ValueError."""
    values = [float(v) for v in values]
    if len(values) != 4:
        raise ValueError(f"a box is 4 numbers [x1, y1, x2, y2], got {len(values)}: {values}")
    return (values[0], values[1], values[2], values[3])


def is_zero_box(box: Sequence[float]) -> bool:
    """True for ``(0, 0, 0, 0)``, the answer meaning "no anomaly"."""
    return all(v == 0 for v in box)


def box_area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_center(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def box_diagonal(box: Box) -> float:
    return math.hypot(max(0.0, box[2] - box[0]), max(0.0, box[3] - box[1]))


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union; 0 when the union is empty."""
    inter = box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0
