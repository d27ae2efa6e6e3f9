"""Equal weighting: every task's loss counts the same (the paper's Base MTL)."""

from __future__ import annotations

from .base import TaskWeighting, register_weighting


@register_weighting
class EqualWeighting(TaskWeighting):
    """Uniform weights 1/K, no state: the base interface's defaults are exactly this method."""

    name = "equal"
