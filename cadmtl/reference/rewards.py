"""GRPO reward functions for reference-guided defect localisation (DifferAD-R1), in TRL's signature.

Each reward is ``reward(completions, solution, **kwargs) -> list[float]``: ``completions`` holds strings or
chat message lists (see :func:`~cadmtl.reference.answers.completion_text`), ``solution`` one truth box
``[x1, y1, x2, y2]`` per sample in the answer's coordinates, ``[0, 0, 0, 0]`` for a normal pair (for
:func:`hungarian_reward`: a list of boxes per sample). TRL passes every dataset column as a keyword argument;
the rewards ignore the ones they do not know. Evaluation may pass ``parse_stats=ParseStats()`` to count
parse failures along the way.

=================  ======================================================================================
reward             value
=================  ======================================================================================
format_reward      1 when the text matches ``<think>.*?</think>\\s*<answer>BOX</answer>``, else 0
iou_reward         normal truth: 1 for the zero box, else 0; anomalous truth: IoU (0 for no box)
dclr_reward        DifferAD-R1's Dual-Consistency Localisation Reward, see :func:`dclr`
hungarian_reward   sum of IoUs of the optimal one-to-one matching / max(#pred, #true)
=================  ======================================================================================

:func:`difficulty_weights` is DifferAD-R1's difficulty-aware weight of each prompt's group in the loss.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from .answers import BOX_PATTERN, ParseStats, completion_text, parse_box, parse_boxes
from .boxes import Box, as_box, box_area, box_center, box_diagonal, box_iou, is_zero_box

FORMAT_PATTERN = re.compile(rf"<think>.*?</think>\s*<answer>\s*(?:{BOX_PATTERN})\s*</answer>", re.DOTALL)


def _texts(completions: Sequence[Any], solution: Sequence[Any] | None, name: str) -> list[str]:
    if solution is not None and len(completions) != len(solution):
        raise ValueError(
            f"{name}: got {len(completions)} completions but {len(solution)} solutions; "
            "pass one solution per completion (TRL repeats each dataset row num_generations times)"
        )
    return [completion_text(c) for c in completions]


def format_reward(completions: Sequence[Any], solution: Sequence[Any] | None = None, **kwargs) -> list[float]:
    """1.0 when the whole answer format is respected (``re.search``: text around it is allowed), else 0.0."""
    return [
        float(FORMAT_PATTERN.search(t) is not None) for t in _texts(completions, solution, "format_reward")
    ]


def iou_reward(
    completions: Sequence[Any], solution: Sequence[Any], parse_stats: ParseStats | None = None, **kwargs
) -> list[float]:
    """IoU of the answer box with the truth; a normal truth wants exactly the zero box."""
    rewards = []
    for text, truth in zip(_texts(completions, solution, "iou_reward"), solution):
        pred, truth = parse_box(text, stats=parse_stats), as_box(truth)
        if is_zero_box(truth):
            rewards.append(float(pred is not None and is_zero_box(pred)))
        else:
            rewards.append(box_iou(pred, truth) if pred is not None else 0.0)
    return rewards


def dclr(pred: Box | None, truth: Box) -> float:
    """Dual-Consistency Localisation Reward of one answer box.

    * normal truth (zero box): 1 when the answer is the zero box, else 0;
    * anomalous truth, answered with no box or the zero box: 0;
    * otherwise ``R = IoU + (1 - IoU) * CA``, the centre-area consistency
      ``CA = 0.6 * (1 - min(1, d / max(diag_pred, diag_true, 1))) + 0.4 * (1 - min(1, |A_pred - A_true| / A_true))``
      with ``d`` the distance between box centres, ``diag`` a box's diagonal and ``A`` its area.

    R is in [IoU, 1]: a miss (IoU 0) still earns credit for a nearby, similarly sized box.
    """
    if is_zero_box(truth):
        return float(pred is not None and is_zero_box(pred))
    if pred is None or is_zero_box(pred):
        return 0.0
    iou = box_iou(pred, truth)
    (px, py), (tx, ty) = box_center(pred), box_center(truth)
    distance = math.hypot(px - tx, py - ty)
    centre = 1 - min(1.0, distance / max(box_diagonal(pred), box_diagonal(truth), 1.0))
    area_true = box_area(truth)
    area = 1 - min(1.0, abs(box_area(pred) - area_true) / area_true) if area_true > 0 else 0.0
    return iou + (1 - iou) * (0.6 * centre + 0.4 * area)


def dclr_reward(
    completions: Sequence[Any], solution: Sequence[Any], parse_stats: ParseStats | None = None, **kwargs
) -> list[float]:
    """:func:`dclr` of each completion's answer box (DifferAD-R1's ``accuracy`` reward)."""
    texts = _texts(completions, solution, "dclr_reward")
    return [dclr(parse_box(t, stats=parse_stats), as_box(s)) for t, s in zip(texts, solution)]


def max_weight_matching(weights: Sequence[Sequence[float]]) -> list[tuple[int, int]]:
    """Optimal one-to-one assignment maximising the summed weight of an (n, m) matrix (Hungarian, O(n^2 m)).

    Returns ``min(n, m)`` pairs ``(row, column)``. The shortest augmenting path method with potentials
    (Kuhn-Munkres as in Jonker-Volgenant), on costs ``-weight``.
    """
    n, m = len(weights), len(weights[0]) if weights else 0
    if n == 0 or m == 0:
        return []
    if n > m:
        return [(r, c) for c, r in max_weight_matching([list(col) for col in zip(*weights)])]
    cost = [[-w for w in row] for row in weights]
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    owner = [0] * (m + 1)  # owner[j]: 1-based row matched to column j (0: free); column 0 is the new row
    way = [0] * (m + 1)
    for row in range(1, n + 1):
        owner[0], col = row, 0
        best = [math.inf] * (m + 1)
        used = [False] * (m + 1)
        while owner[col] != 0:
            used[col], r, delta, nxt = True, owner[col], math.inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    reduced = cost[r - 1][j - 1] - u[r] - v[j]
                    if reduced < best[j]:
                        best[j], way[j] = reduced, col
                    if best[j] < delta:
                        delta, nxt = best[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    best[j] -= delta
            col = nxt
        while col:  # augment along the path back to column 0
            prev = way[col]
            owner[col] = owner[prev]
            col = prev
    return [(owner[j] - 1, j - 1) for j in range(1, m + 1) if owner[j]]


def matched_iou(preds: Sequence[Box], truths: Sequence[Box]) -> float:
    """Sum of IoUs of the optimal one-to-one matching / max(#pred, #true); 1 when both are empty."""
    if not preds and not truths:
        return 1.0
    if not preds or not truths:
        return 0.0
    ious = [[box_iou(p, t) for t in truths] for p in preds]
    total = sum(ious[r][c] for r, c in max_weight_matching(ious))
    return total / max(len(preds), len(truths))


def _truth_boxes(truth: Sequence[Any]) -> list[Box]:
    """A sample's truth as a list of non-zero boxes; a single flat ``[x1, y1, x2, y2]`` is accepted too."""
    if len(truth) == 4 and all(isinstance(v, (int, float)) for v in truth):
        truth = [truth]
    return [b for b in (as_box(t) for t in truth) if not is_zero_box(b)]


def hungarian_reward(
    completions: Sequence[Any],
    solution: Sequence[Sequence[Any]],
    parse_stats: ParseStats | None = None,
    **kwargs,
) -> list[float]:
    """:func:`matched_iou` of every box in the answer against the truth boxes.

    Zero boxes mean "normal" on both sides: ``[]`` or ``[[0, 0, 0, 0]]`` truth, ``(0,0),(0,0)`` answer.
    An answer with no parseable box scores 0, even for a normal truth.
    """
    rewards = []
    for text, truth in zip(_texts(completions, solution, "hungarian_reward"), solution):
        preds = parse_boxes(text, stats=parse_stats)
        if preds is None:
            rewards.append(0.0)
        else:
            rewards.append(matched_iou([b for b in preds if not is_zero_box(b)], _truth_boxes(truth)))
    return rewards


def difficulty_weights(accuracies: torch.Tensor, error_threshold: float = 0.3) -> torch.Tensor:
    """DifferAD-R1's difficulty-aware weight of each group: (B, G) accuracy rewards -> (B,) weights.

    ``w_b = (exp(1 - mean(accuracies)) + sqrt(1 + p_err_b)) / 2`` where ``mean(accuracies)`` is the mean over
    the whole batch (all B x G completions, the same for every group) and ``p_err_b`` the share of group
    b's G completions with accuracy < ``error_threshold``. Weights lie in [(1 + 1) / 2, (e + sqrt 2) / 2]
    = [1, 2.066] for accuracies in [0, 1]; harder batches and groups with more failures weigh more.
    """
    if accuracies.dim() != 2:
        raise ValueError(f"accuracies must be (batch, generations), got shape {tuple(accuracies.shape)}")
    accuracies = accuracies.float()
    p_err = (accuracies < error_threshold).float().mean(dim=1)
    return (torch.exp(1 - accuracies.mean()) + torch.sqrt(1 + p_err)) / 2
