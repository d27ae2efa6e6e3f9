"""TaskScheduler: softmax(w / T) sampling that every rank reproduces from (seed, step, weights) alone."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from cadmtl.training.scheduler import TaskScheduler, uniform_from_seed_and_step

TASKS = ["cls", "det", "seg"]
COBA_WEIGHTS = {"cls": 0.2, "det": 0.3, "seg": 0.5}


def softmax(values: np.ndarray) -> np.ndarray:
    exponentials = np.exp(values - values.max())
    return exponentials / exponentials.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.2, 0.05])
def test_sampling_frequencies_match_softmax_of_weights_over_temperature(temperature):
    scheduler = TaskScheduler(TASKS, temperature=temperature, seed=11)
    scheduler.set_weights(COBA_WEIGHTS)
    expected = softmax(np.array(list(COBA_WEIGHTS.values())) / temperature)
    np.testing.assert_allclose(list(scheduler.probabilities.values()), expected, rtol=1e-12)

    num_draws = 20_000
    draws = [scheduler.sample(step) for step in range(num_draws)]
    frequencies = np.array([draws.count(task) for task in TASKS]) / num_draws
    tolerance = 4.5 * np.sqrt(expected * (1 - expected) / num_draws)  # 4.5 sigma: a false alarm ~1e-5
    assert np.all(np.abs(frequencies - expected) <= tolerance), (frequencies, expected)


def test_uniform_weights_before_set_weights():
    scheduler = TaskScheduler(TASKS)
    assert scheduler.probabilities == pytest.approx(dict.fromkeys(TASKS, 1 / 3))


def test_same_seed_and_step_give_the_same_task_whatever_the_call_order():
    steps = list(range(500))
    first = TaskScheduler(TASKS, temperature=0.1, seed=5)
    first.set_weights(COBA_WEIGHTS)
    in_order = [first.sample(step) for step in steps]

    # Another "rank": reversed order, repeated draws, and disturbed global random states.
    second = TaskScheduler(TASKS, temperature=0.1, seed=5)
    second.set_weights(COBA_WEIGHTS)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    shuffled = list(reversed(steps))
    drawn = {step: second.sample(step) for step in shuffled}
    assert [second.sample(7)] * 3 == [drawn[7]] * 3
    assert [drawn[step] for step in steps] == in_order
    assert len(set(in_order)) == 3

    other_seed = TaskScheduler(TASKS, temperature=0.1, seed=6)
    other_seed.set_weights(COBA_WEIGHTS)
    assert [other_seed.sample(step) for step in steps] != in_order


def test_draws_are_pinned_for_a_seed():
    """The draw sequence is part of the checkpoint contract: a resumed run on another machine or NumPy
    version must draw the same tasks. These values come from numpy's SeedSequence hash."""
    values = [uniform_from_seed_and_step(0, step) for step in range(4)]
    assert all(0.0 <= value < 1.0 for value in values)
    repeated = [uniform_from_seed_and_step(0, step) for step in range(4)]
    assert values == repeated
    scheduler = TaskScheduler(TASKS, seed=0)
    expected = [TASKS[min(int(value * 3), 2)] for value in values]
    assert [scheduler.sample(step) for step in range(4)] == expected
    assert values == PINNED_UNIFORMS_SEED_0


PINNED_UNIFORMS_SEED_0 = [0.4699398979718967, 0.26464840633718945, 0.8919019705510483, 0.7176545220097089]


def test_weights_passed_to_sample_are_used_for_that_draw_only():
    scheduler = TaskScheduler(TASKS, temperature=0.01, seed=3)
    one_hot = {"cls": 0.0, "det": 0.0, "seg": 1.0}
    assert {scheduler.sample(step, weights=one_hot) for step in range(50)} == {"seg"}
    assert scheduler.weights == pytest.approx(dict.fromkeys(TASKS, 1 / 3))
    assert len({scheduler.sample(step) for step in range(50)}) == 3


def test_round_robin_and_single_modes():
    robin = TaskScheduler(TASKS, mode="round_robin", seed=9)
    robin.set_weights({"cls": 0.0, "det": 0.0, "seg": 100.0})  # stored, but round robin ignores it
    assert [robin.sample(step) for step in range(7)] == ["cls", "det", "seg", "cls", "det", "seg", "cls"]
    assert robin.sample(3001) == "det"
    assert robin.probabilities == pytest.approx(dict.fromkeys(TASKS, 1 / 3))

    single = TaskScheduler(["seg"], mode="single")
    assert {single.sample(step) for step in range(20)} == {"seg"}
    assert single.probabilities == {"seg": 1.0}
    with pytest.raises(ValueError, match=r"mode='single' trains one task.*\['cls', 'det', 'seg'\]"):
        TaskScheduler(TASKS, mode="single")


def test_state_round_trip_restores_the_draws(tmp_path, caplog):
    source = TaskScheduler(TASKS, temperature=0.3, seed=21)
    source.set_weights(COBA_WEIGHTS)
    torch.save(source.state_dict(), tmp_path / "scheduler.pt")

    restored = TaskScheduler(TASKS)  # different seed and temperature from the config
    with caplog.at_level(logging.WARNING, logger="cadmtl.training.scheduler"):
        restored.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))
    assert "seed=21 from the checkpoint replaces 0" in caplog.text
    assert restored.state_dict() == source.state_dict()
    assert [restored.sample(step) for step in range(300)] == [source.sample(step) for step in range(300)]

    with pytest.raises(ValueError, match=r"saved for the tasks \['cls', 'det', 'seg'\].*\['cls', 'det'\]"):
        TaskScheduler(["cls", "det"]).load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match=r"missing the keys \['mode'"):
        TaskScheduler(TASKS).load_state_dict({"task_names": TASKS})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task_names": []}, "at least one task"),
        ({"task_names": ["cls", "cls"]}, "duplicates"),
        ({"temperature": 0}, "temperature must be a finite number > 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"seed": 1.5}, "seed must be a non-negative integer"),
        ({"mode": "random"}, r"mode must be one of \['adaptive', 'round_robin', 'single'\]"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskScheduler(**{"task_names": TASKS, **kwargs})


def test_bad_weights_and_steps_are_rejected():
    scheduler = TaskScheduler(TASKS)
    with pytest.raises(ValueError, match=r"missing \['seg'\], unknown \['depth'\]"):
        scheduler.set_weights({"cls": 1.0, "det": 1.0, "depth": 1.0})
    with pytest.raises(ValueError, match="weight of task 'det' must be finite, got nan"):
        scheduler.set_weights({"cls": 1.0, "det": float("nan"), "seg": 1.0})
    with pytest.raises(ValueError, match="step must be >= 0"):
        scheduler.sample(-1)
    with pytest.raises(ValueError, match="step must be an integer"):
        scheduler.sample(1.5)
    assert scheduler.sample(np.int64(4)) == scheduler.sample(4)
