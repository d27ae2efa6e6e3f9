"""Answer parsing and the GRPO rewards of reference-guided localisation, on hand-computed values."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torchvision.ops import box_iou as tv_box_iou

from cadmtl.reference.answers import ParseStats, completion_text, parse_box, parse_boxes
from cadmtl.reference.boxes import box_iou
from cadmtl.reference.rewards import (
    dclr,
    dclr_reward,
    difficulty_weights,
    format_reward,
    hungarian_reward,
    iou_reward,
    matched_iou,
    max_weight_matching,
)


def answer(box: str, think: str = "the scratch is left of the handle") -> str:
    return f"<think>{think}</think>\n<answer>{box}</answer>"


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# ----------------------------------------------------------------------------------------------- parsing


def test_completion_text_accepts_strings_messages_and_parts():
    parts = [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "<answer>"}, {"type": "text", "text": "x"}],
        }
    ]
    assert completion_text("plain") == "plain"
    assert completion_text(chat("hello")) == "hello"
    assert completion_text(parts) == "<answer>x"
    assert completion_text([]) == ""


@pytest.mark.parametrize(
    "text, box",
    [
        ("<answer>(1,2),(3,4)</answer>", (1, 2, 3, 4)),
        ("<answer> ( 1 , 2 ) , ( 3.5 , 4 ) </answer>", (1, 2, 3.5, 4)),
        ("<answer>[10, 20, 30, 40]</answer>", (10, 20, 30, 40)),
        ("<answer>\nThe box is (0,0),(0,0).\n</answer>", (0, 0, 0, 0)),
        ("<answer>(0,0),(0,0)</answer>", (0, 0, 0, 0)),
    ],
)
def test_parse_box_forms(text, box):
    assert parse_box(text) == tuple(float(v) for v in box)


def test_box_outside_answer_tag_is_ignored():
    stats = ParseStats()
    assert parse_box("<think>(1,1),(9,9)</think><answer>no defect</answer>", stats=stats) is None
    assert parse_box("(1,1),(9,9) <answer>(2,2),(4,4)</answer>") == (2, 2, 4, 4)
    assert parse_box("(1,1),(9,9)", stats=stats) is None
    assert (stats.no_box, stats.no_answer_tag, stats.parsed) == (1, 1, 0)


def test_parse_counts_every_case():
    stats = ParseStats()
    assert parse_box("<answer>(30,40),(10,20)</answer>", stats=stats) == (10, 20, 30, 40)  # inverted
    assert parse_box("<answer>(-5,10),(120,50)</answer>", image_size=(100, 100), stats=stats) == (
        0,
        10,
        100,
        50,
    )
    assert parse_box("<answer>(5,5),(5,9)</answer>", stats=stats) is None  # zero width: degenerate
    assert parse_box("<answer>(150,10),(160,20)</answer>", image_size=(100, 100), stats=stats) is None
    assert parse_box("<answer>(1,2),(3,4) or (5,6),(7,8)</answer>", stats=stats) == (1, 2, 3, 4)
    assert parse_box("<answer>(1,2),(3)</answer>", stats=stats) is None  # malformed
    assert parse_box("no tags at all", stats=stats) is None
    assert stats == ParseStats(
        total=7, parsed=3, no_answer_tag=1, no_box=1, degenerate=2, inverted=1, clipped=2, several_boxes=1
    )
    assert stats.failure_rate == pytest.approx(4 / 7)
    assert stats.as_dict()["failure_rate"] == pytest.approx(4 / 7)


def test_parse_boxes_returns_all_valid_boxes():
    stats = ParseStats()
    text = "<answer>(0,0),(10,10); [20, 20, 30, 30]; (5,5),(5,5); (0,0),(0,0)</answer>"
    assert parse_boxes(text, stats=stats) == [(0, 0, 10, 10), (20, 20, 30, 30), (0, 0, 0, 0)]
    assert parse_boxes("<answer>(5,5),(5,9)</answer>", stats=stats) is None
    assert parse_boxes("<answer></answer>", stats=stats) is None
    assert (stats.total, stats.parsed, stats.degenerate, stats.no_box, stats.several_boxes) == (3, 1, 1, 1, 1)


def test_scalar_iou_matches_torchvision():
    rng = random.Random(0)
    for _ in range(50):
        a, b = ([rng.uniform(0, 50), rng.uniform(0, 50)] for _ in range(2))
        box_a = (a[0], a[1], a[0] + rng.uniform(1, 40), a[1] + rng.uniform(1, 40))
        box_b = (b[0], b[1], b[0] + rng.uniform(1, 40), b[1] + rng.uniform(1, 40))
        expected = tv_box_iou(
            torch.tensor([box_a], dtype=torch.float64), torch.tensor([box_b], dtype=torch.float64)
        )
        assert box_iou(box_a, box_b) == pytest.approx(expected.item())


# ----------------------------------------------------------------------------------------------- rewards


def test_format_reward():
    completions = [
        answer("(1,2),(3,4)"),
        chat(answer("[1, 2, 3, 4]")),
        "<answer>(1,2),(3,4)</answer>",  # no think
        answer("the box is (1,2),(3,4)"),  # text inside the answer
        "<think>a</think> words <answer>(1,2),(3,4)</answer>",  # text between the tags
        answer("(0,0),(0,0)"),
    ]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_iou_reward():
    completions = [
        answer("(0,0),(10,10)"),  # truth (5,5,15,15): inter 25, union 175 -> 1/7
        chat(answer("(5,5),(15,15)")),  # exact
        answer("(0,0),(0,0)"),  # normal truth, zero box -> 1
        answer("(1,1),(2,2)"),  # normal truth, a box -> 0
        "<think>fine</think><answer>normal</answer>",  # normal truth, no box -> 0
        answer("(0,0),(0,0)"),  # anomalous truth, zero box -> 0
    ]
    solution = [[5, 5, 15, 15], [5, 5, 15, 15], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [5, 5, 15, 15]]
    assert iou_reward(completions, solution) == pytest.approx([1 / 7, 1.0, 1.0, 0.0, 0.0, 0.0])


def test_dclr_worked_example():
    # pred (0,0,10,10), truth (5,5,15,15):
    #   IoU = 25 / (100 + 100 - 25) = 1/7
    #   centres (5,5) and (10,10): d = sqrt(50) = 7.0711; diagonals both sqrt(200) = 14.142 -> d / diag = 0.5
    #   areas 100 and 100 -> |A_pred - A_true| / A_true = 0
    #   CA = 0.6 * (1 - 0.5) + 0.4 * (1 - 0) = 0.7
    #   R = 1/7 + (6/7) * 0.7 = 0.142857 + 0.6 = 0.742857
    assert dclr((0, 0, 10, 10), (5, 5, 15, 15)) == pytest.approx(1 / 7 + 0.6)
    # a disjoint miss: pred (20,0,24,2), truth (0,0,10,10): IoU 0
    #   centres (22,1) and (5,5): d = sqrt(17^2 + 4^2) = 17.46 > max diag sqrt(200) -> centre term 0
    #   areas 8 and 100: 1 - 92/100 = 0.08 -> CA = 0.4 * 0.08 = 0.032 = R
    assert dclr((20, 0, 24, 2), (0, 0, 10, 10)) == pytest.approx(0.032)
    # tiny boxes: the diagonal floor of 1 applies. pred (0,0,0.5,0.5), truth (0.25,0,0.75,0.5):
    #   IoU = 0.125 / 0.375 = 1/3; d = 0.25, max(diag 0.707, 0.707, 1) = 1 -> centre 0.75; area term 1
    #   CA = 0.6 * 0.75 + 0.4 = 0.85; R = 1/3 + 2/3 * 0.85 = 0.9
    assert dclr((0, 0, 0.5, 0.5), (0.25, 0, 0.75, 0.5)) == pytest.approx(0.9)


def test_dclr_reward_cases():
    completions = [
        answer("(0,0),(10,10)"),
        chat(answer("(0,0),(0,0)")),  # normal truth, zero box
        answer("(3,3),(4,4)"),  # normal truth, a box
        "<think>ok</think><answer>nothing</answer>",  # normal truth, no box: not the zero box
        answer("(0,0),(0,0)"),  # anomalous truth, zero box
        "(0,0),(10,10)",  # anomalous truth, box outside the tags
        answer("(10,10),(0,0)"),  # inverted corners are repaired
    ]
    solution = [[5, 5, 15, 15], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [5, 5, 15, 15], [5, 5, 15, 15]]
    solution.append([5, 5, 15, 15])
    stats = ParseStats()
    rewards = dclr_reward(completions, solution, parse_stats=stats, prompts=["ignored"] * 7)
    assert rewards == pytest.approx([1 / 7 + 0.6, 1.0, 0.0, 0.0, 0.0, 0.0, 1 / 7 + 0.6])
    assert (stats.total, stats.parsed, stats.no_box, stats.no_answer_tag, stats.inverted) == (7, 5, 1, 1, 1)


def test_length_mismatch_is_a_clear_error():
    for reward in (format_reward, iou_reward, dclr_reward, hungarian_reward):
        with pytest.raises(ValueError, match="2 completions but 1 solutions"):
            reward([answer("(0,0),(1,1)")] * 2, [[0, 0, 1, 1]])


# ----------------------------------------------------------------------------------------------- hungarian


def test_max_weight_matching_is_optimal():
    rng = random.Random(1)
    for _ in range(100):
        n, m = rng.randint(1, 5), rng.randint(1, 5)
        weights = [[rng.random() for _ in range(m)] for _ in range(n)]
        pairs = max_weight_matching(weights)
        assert len(pairs) == min(n, m)
        assert len({r for r, _ in pairs}) == len({c for _, c in pairs}) == len(pairs)
        if n <= m:
            best = max(
                sum(weights[i][c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(m), n)
            )
        else:
            best = max(
                sum(weights[r][j] for j, r in enumerate(rows)) for rows in itertools.permutations(range(n), m)
            )
        assert sum(weights[r][c] for r, c in pairs) == pytest.approx(best)


def test_matched_iou_prefers_the_global_optimum():
    # greedy would match pred 0 to truth 0 (IoU 0.6) and leave pred 1 on truth 1 (IoU 0);
    # the optimum crosses: pred 0 -> truth 1 (0.5), pred 1 -> truth 0 (0.5) = 1.0 > 0.6
    ious = [[0.6, 0.5], [0.5, 0.0]]
    assert sorted(max_weight_matching(ious)) == [(0, 1), (1, 0)]
    assert matched_iou([], []) == 1.0
    assert matched_iou([(0, 0, 1, 1)], []) == 0.0


def test_hungarian_reward():
    truth = [[20, 20, 30, 30], [0, 0, 10, 10]]
    completions = [
        answer("(0,0),(10,10), (20,20),(30,30)"),  # both right, other order -> 1
        chat(answer("(0,0),(10,10)")),  # one of two -> 1 / 2
        answer("(0,0),(10,10) (20,20),(30,30) (50,50),(60,60)"),  # one extra -> 2 / 3
        answer("(0,0),(0,0)"),  # normal truth [] -> 1
        answer("(0,0),(0,0)"),  # normal truth [[0,0,0,0]] -> 1
        "<think>x</think><answer>none</answer>",  # normal truth, no box -> 0
        answer("(1,1),(2,2)"),  # normal truth, a box -> 0
        answer("(0,0),(0,0)"),  # anomalous truth, zero box -> 0
        answer("(0,0),(10,10)"),  # a flat truth box is accepted too -> 1
    ]
    solution = [truth, truth, truth, [], [[0, 0, 0, 0]], [], [], truth, [0, 0, 10, 10]]
    assert hungarian_reward(completions, solution) == pytest.approx([1, 0.5, 2 / 3, 1, 1, 0, 0, 0, 1])


# ----------------------------------------------------------------------------------------------- weighting


def test_difficulty_weights():
    acc = torch.tensor([[1.0, 1.0, 0.0, 0.2], [1.0, 1.0, 1.0, 1.0]])
    # batch mean = (2.2 + 4) / 8 = 0.775 -> exp(0.225); p_err = [2/4 (0.0 and 0.2 < 0.3), 0]
    expected = torch.tensor([(math.exp(0.225) + math.sqrt(1.5)) / 2, (math.exp(0.225) + 1.0) / 2])
    torch.testing.assert_close(difficulty_weights(acc), expected)
    assert difficulty_weights(torch.ones(3, 2)).tolist() == pytest.approx([1.0] * 3)
    assert difficulty_weights(torch.zeros(1, 4)).item() == pytest.approx((math.e + math.sqrt(2)) / 2)
    with pytest.raises(ValueError, match="batch, generations"):
        difficulty_weights(torch.ones(4))
