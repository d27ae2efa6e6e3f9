"""Reading the box out of a reference-guided answer ``<think>...</think><answer>(x1,y1),(x2,y2)</answer>``.

Rules (DifferAD-R1's answer format, made explicit):

* only the first ``<answer>...</answer>`` counts; a box written outside it is ignored;
* a box is ``(x1,y1),(x2,y2)`` or ``[x1, y1, x2, y2]`` (the square-bracket form DifferAD-R1's parser also
  accepts), with optional spaces and signed integers or decimals; the answer box is the first one;
* ``(0,0),(0,0)`` is the zero box, the "no anomaly" answer; an answer with no parseable box is ``None``,
  which is *not* the zero box (a normal pair answered with no box scores 0);
* inverted corners (x1 > x2 or y1 > y2) are swapped; with ``image_size=(height, width)`` (torchvision's
  order) the box is clipped to ``[0, width] x [0, height]``; a box of zero area that is not the zero box
  (before or after clipping) is degenerate and rejected.

Each parse can be counted in a :class:`ParseStats`, so an evaluation reports its parse-failure rate.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .boxes import Box, is_zero_box

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
BOX_PATTERN = (
    rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*,\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)"
    rf"|\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]"
)
"""One box, in either form; groups 1-4 hold the parenthesis form, groups 5-8 the square-bracket form."""

_BOX_RE = re.compile(BOX_PATTERN)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclasses.dataclass
class ParseStats:
    """Counts over parsed answers.

    Outcomes, one per answer (they sum to ``total``): ``parsed`` (a box came back, the zero box included),
    ``no_answer_tag``, ``no_box`` (tags but no box inside), ``degenerate`` (every box had zero area).
    Events, counted per box or per answer and not exclusive: ``inverted`` and ``clipped`` boxes that were
    repaired, ``several_boxes`` answers holding more than one box.
    """

    total: int = 0
    parsed: int = 0
    no_answer_tag: int = 0
    no_box: int = 0
    degenerate: int = 0
    inverted: int = 0
    clipped: int = 0
    several_boxes: int = 0

    @property
    def failure_rate(self) -> float:
        """Share of answers that gave no box (0 when nothing was parsed yet)."""
        return (self.total - self.parsed) / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "failure_rate": self.failure_rate}


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a TRL completion: a string, or a chat message list whose last message is the answer.

    A message's ``content`` is a string or a list of parts ``{"type": "text", "text": ...}`` (other part
    types are skipped).
    """
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    content = completion[-1].get("content", "")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type", "text") == "text")


def answer_span(text: str) -> str | None:
    """The inside of the first ``<answer>...</answer>``, or None."""
    match = _ANSWER_RE.search(text)
    return match.group(1) if match else None


def _repair(
    raw: Sequence[float], image_size: tuple[float, float] | None, stats: ParseStats | None
) -> Box | None:
    """Order, clip and validate one raw box; None when degenerate."""
    x1, y1, x2, y2 = raw
    if is_zero_box(raw):
        return (0.0, 0.0, 0.0, 0.0)
    if x1 > x2 or y1 > y2:
        x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
        if stats is not None:
            stats.inverted += 1
    if image_size is not None:
        height, width = image_size
        clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height))
        clipped += (min(max(x2, 0.0), width), min(max(y2, 0.0), height))
        if clipped != (x1, y1, x2, y2):
            x1, y1, x2, y2 = clipped
            if stats is not None:
                stats.clipped += 1
    if x2 <= x1 or y2 <= y1:
        return None
    return (x1, y1, x2, y2)


def _raw_boxes(span: str) -> list[tuple[float, float, float, float]]:
    boxes = []
    for match in _BOX_RE.finditer(span):
        groups = match.groups()
        values = groups[:4] if groups[0] is not None else groups[4:]
        boxes.append(tuple(float(v) for v in values))
    return boxes


def _count(stats: ParseStats | None, span: str | None, raw: list, found: bool) -> None:
    """Record one answer's outcome."""
    if stats is None:
        return
    stats.total += 1
    stats.several_boxes += len(raw) > 1
    if span is None:
        stats.no_answer_tag += 1
    elif not raw:
        stats.no_box += 1
    elif not found:
        stats.degenerate += 1
    else:
        stats.parsed += 1


def parse_boxes(
    text: str, image_size: tuple[float, float] | None = None, stats: ParseStats | None = None
) -> list[Box] | None:
    """Every valid box inside the first ``<answer>`` tag, in order; None when there is none.

    Degenerate boxes are dropped (the outcome is ``degenerate`` only when all of them are); zero boxes are
    kept, the caller decides what "normal" means for several boxes.
    """
    span = answer_span(text)
    raw = _raw_boxes(span) if span is not None else []
    boxes = [box for box in (_repair(r, image_size, stats) for r in raw) if box is not None]
    _count(stats, span, raw, found=bool(boxes))
    return boxes or None


def parse_box(
    text: str, image_size: tuple[float, float] | None = None, stats: ParseStats | None = None
) -> Box | None:
    """The answer box: the first box inside the first ``<answer>`` tag, repaired; None when there is none.

    A degenerate first box gives None (later boxes are not a fallback: the answer is the first box).
    """
    span = answer_span(text)
    raw = _raw_boxes(span) if span is not None else []
    box = _repair(raw[0], image_size, stats) if raw else None
    _count(stats, span, raw, found=box is not None)
    return box
