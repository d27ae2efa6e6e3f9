"""CoBa against hand-built validation-loss trajectories and an independent re-computation of the official
formulas (codefuse-ai/MFTCoder ``CoBaStatus``, as described in the shared docs/coba.md)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from cadmtl.training.launch import reset_accelerate_state
from cadmtl.training.scheduler import TaskScheduler
from cadmtl.training.weighting.coba import CoBa, CoBaScores, window_slope

# --------------------------------------------------------------------------- reference implementation


class OfficialCoBaReference:
    """Straight numpy transcription of the official ``compute_per_task_weight`` with interval 1.

    It keeps the whole history like the official code and uses its absolute step numbers, slices and
    normal-equation fit, so it checks our windows and index bookkeeping rather than repeating them.
    Step c of the official trainer is our update call c: at that point the history holds c - 1 ratios.
    """

    def __init__(self, warmup: int, history: int, tau: float, clamp: bool):
        self.warmup, self.history, self.tau, self.clamp = warmup, history, tau, clamp
        self.reference: np.ndarray | None = None
        self.ratios: list[np.ndarray] = []
        self.task_slopes: list[np.ndarray] = []
        self.max_slopes: list[float] = []
        self.calls = 0
        self.scores: dict[str, object] = {}

    @staticmethod
    def fit_slope(x: np.ndarray, y: np.ndarray) -> float:
        y = y[y != 0]
        x = x[: len(y)]  # the official close-up
        if len(y) < 2:
            return 0.0
        design = np.stack([x.astype(np.float64), np.ones(len(x))]).T
        return float(np.linalg.solve(design.T @ design, design.T @ y)[0])

    def update(self, losses: np.ndarray) -> np.ndarray:
        self.calls += 1
        c = self.calls
        num_tasks = len(losses)
        if self.reference is None:
            self.reference = np.asarray(losses, dtype=np.float64)
        else:
            self.ratios.append(np.asarray(losses, dtype=np.float64) / self.reference)
        if c < self.warmup:
            return np.full(num_tasks, 1 / num_tasks)
        history = np.stack(self.ratios, axis=1)  # (K, c - 1)
        start = max(0, c - self.history)
        steps = np.arange(start, c)
        slopes = np.array([self.fit_slope(steps, history[i][-len(steps) :]) for i in range(num_tasks)])
        beta = self.fit_slope(steps, history[:, -len(steps) :].max(axis=0))
        self.task_slopes.append(slopes)
        self.max_slopes.append(beta)

        def softmax(v: np.ndarray) -> np.ndarray:
            e = np.exp(v - v.max())
            return e / e.sum()

        rcs = softmax(num_tasks * slopes / np.abs(slopes).sum())
        window = np.stack(self.task_slopes, axis=1)[:, start:]  # (K, M), column 0 = step W
        acs = softmax((-window.shape[1] * window / np.abs(window).sum(axis=1, keepdims=True))[:, -1])
        betas = np.array(self.max_slopes)
        n = len(betas)
        df_raw = softmax(self.tau * (-n * betas / np.abs(betas).sum()))[-1] * n
        df = min(df_raw, 1.0) if self.clamp else df_raw
        weights = softmax(num_tasks * (df * rcs + (1 - df) * acs))
        floor = 1 / (10 * num_tasks)
        if (weights < floor).any():
            weights = weights * (1 - floor * num_tasks) + floor
        self.scores = {"slopes": slopes, "beta": beta, "rcs": rcs, "acs": acs, "df": df, "df_raw": df_raw}
        return weights


# --------------------------------------------------------------------------- trajectories (rows = calls)


def fast_and_slow(num_calls: int) -> dict[str, np.ndarray]:
    t = np.arange(num_calls, dtype=np.float64)
    return {"fast": np.exp(-t / 50) + 0.01, "slow": np.exp(-t / 500)}


def three_tasks_one_diverging(num_calls: int, turn: int = 100) -> dict[str, np.ndarray]:
    t = np.arange(num_calls, dtype=np.float64)
    diverging = np.where(t < turn, np.exp(-t / 100), np.exp(-turn / 100) + 0.004 * (t - turn))
    return {"cls": diverging, "det": 2.0 * np.exp(-t / 150), "seg": 0.5 * np.exp(-t / 80)}


def noisy_three_tasks(num_calls: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(num_calls, dtype=np.float64)
    clean = {"cls": np.exp(-t / 30) + 0.2, "det": np.exp(-t / 300) + 0.1, "seg": 0.8 * np.exp(-t / 100) + 0.1}
    return {name: curve * (1 + 0.02 * rng.standard_normal(num_calls)) for name, curve in clean.items()}


def plateau_then_drop(num_calls: int) -> dict[str, np.ndarray]:
    """The max-ratio curve is flat, then falls: its latest slope is steeper than its history (DF > 1)."""
    t = np.arange(num_calls, dtype=np.float64)
    slow = np.where(t < 40, 1.0 - 0.0001 * t, 0.996 - 0.01 * (t - 40))
    return {"a": slow, "b": 0.9 * np.exp(-t / 40), "c": 0.8 * np.exp(-t / 25)}


def run(coba: CoBa, trajectories: dict[str, np.ndarray], calls: range) -> list[dict[str, float]]:
    return [coba.update({name: float(curve[i]) for name, curve in trajectories.items()}) for i in calls]


# --------------------------------------------------------------------------- agreement with the official maths


@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize(
    ("make_trajectories", "num_calls", "warmup", "history"),
    [
        (fast_and_slow, 150, 10, 40),
        (three_tasks_one_diverging, 220, 10, 40),
        (noisy_three_tasks, 150, 8, 30),
        (plateau_then_drop, 90, 20, 30),
    ],
)
def test_matches_official_formulas_at_every_call(make_trajectories, num_calls, warmup, history, clamp):
    trajectories = make_trajectories(num_calls)
    coba = CoBa(list(trajectories), history_length=history, warmup_steps=warmup, clamp_divergence=clamp)
    reference = OfficialCoBaReference(warmup, history, tau=5.0, clamp=clamp)
    for i in range(num_calls):
        losses = np.array([curve[i] for curve in trajectories.values()])
        expected = reference.update(losses)
        got = coba.update(dict(zip(trajectories, losses.tolist())))
        np.testing.assert_allclose(list(got.values()), expected, rtol=1e-9, atol=1e-12)
        if coba.last_scores is not None:
            scores = coba.last_scores
            np.testing.assert_allclose(
                list(scores.slopes.values()), reference.scores["slopes"], rtol=1e-7, atol=1e-15
            )
            np.testing.assert_allclose(
                scores.max_ratio_slope, reference.scores["beta"], rtol=1e-7, atol=1e-15
            )
            np.testing.assert_allclose(list(scores.rcs.values()), reference.scores["rcs"], rtol=1e-9)
            np.testing.assert_allclose(list(scores.acs.values()), reference.scores["acs"], rtol=1e-9)
            np.testing.assert_allclose(scores.raw_divergence_factor, reference.scores["df_raw"], rtol=1e-9)
            np.testing.assert_allclose(scores.divergence_factor, reference.scores["df"], rtol=1e-9)


def test_unclamped_divergence_factor_exceeds_one_and_clamp_caps_it():
    """coba.md §2: when the max-ratio curve's fall speeds up (plateau, then drop), the official DF > 1."""
    trajectories = plateau_then_drop(90)
    unclamped = CoBa(list(trajectories), history_length=30, warmup_steps=20, clamp_divergence=False)
    clamped = CoBa(list(trajectories), history_length=30, warmup_steps=20)
    run(unclamped, trajectories, range(60))
    run(clamped, trajectories, range(60))
    raw = unclamped.last_scores.raw_divergence_factor
    assert raw > 2.0
    assert unclamped.last_scores.divergence_factor == raw
    assert clamped.last_scores.raw_divergence_factor == pytest.approx(raw, rel=1e-12)
    assert clamped.last_scores.divergence_factor == 1.0

    # Clamped, DF = 1 leaves RCS alone: w = softmax(K * RCS) (the floor does not bite here).
    rcs = np.array(list(clamped.last_scores.rcs.values()))
    expected = np.exp(3 * rcs) / np.exp(3 * rcs).sum()
    np.testing.assert_allclose(list(clamped.weights.values()), expected, rtol=1e-12)

    # Unclamped, 1 - DF < 0 extrapolates past RCS and only the 1/(10K) floor holds the smallest weight.
    weights = np.array(list(unclamped.weights.values()))
    assert unclamped.last_scores.floor_applied
    assert weights.min() >= 1 / 30 - 1e-12
    assert weights.max() > np.max(expected)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)


def test_all_rising_tasks_give_the_documented_weights():
    """coba.md §2: all tasks rising with slopes 1, 2, 3e-3 give w = [0.198, 0.285, 0.517].

    The example holds with our convention (call 1 = reference, no history point for it): the losses are
    l_i(n) = l_i(0) (1 + s_i (n - 1)), so every ratio point is 1 + s_i x exactly and the window slopes are
    s_i whether or not a ratio-1 point at x = 0 is in the window. DF = 1 because the max-ratio curve (the
    steepest task) has the same slope at every call; ACS is uniform (each task's slope never changes).
    """
    slopes = np.array([1e-3, 2e-3, 3e-3])
    reference_losses = np.array([0.7, 1.3, 2.0])
    coba = CoBa(["a", "b", "c"], history_length=30, warmup_steps=10)
    for n in range(1, 60):
        losses = reference_losses * (1 + slopes * (n - 1))
        weights = coba.update(dict(zip("abc", losses.tolist())))
        if n >= 10:
            np.testing.assert_allclose(list(coba.last_scores.slopes.values()), slopes, rtol=1e-9)
            assert coba.last_scores.divergence_factor == pytest.approx(1.0, abs=1e-9)
            np.testing.assert_allclose(list(coba.last_scores.acs.values()), [1 / 3] * 3, rtol=1e-9)
            np.testing.assert_allclose(list(weights.values()), [0.198, 0.285, 0.517], atol=5e-4)


# --------------------------------------------------------------------------- behaviour on hand-built runs


def test_slow_task_gets_more_weight_than_fast_task_while_divergence_factor_is_high():
    trajectories = fast_and_slow(120)
    coba = CoBa(list(trajectories), history_length=40, warmup_steps=10)
    checked = 0
    for i in range(120):
        weights = coba.update({name: float(curve[i]) for name, curve in trajectories.items()})
        scores = coba.last_scores
        if scores is not None and scores.divergence_factor > 0.8:
            assert weights["slow"] > weights["fast"] + 0.2
            checked += 1
    assert checked >= 30
    assert coba.last_scores.divergence_factor < 0.8  # DF decays as the max-ratio curve flattens


def test_diverging_task_is_down_weighted_once_divergence_factor_falls():
    trajectories = three_tasks_one_diverging(220, turn=100)
    coba = CoBa(list(trajectories), history_length=40, warmup_steps=10)
    history = run(coba, trajectories, range(220))
    before_turn = history[95]
    assert before_turn["cls"] > 0.25  # not singled out while it still converges
    assert coba.last_scores.divergence_factor < 0.05
    assert coba.last_scores.slopes["cls"] > 0 > coba.last_scores.slopes["det"]
    for weights in history[150:]:
        assert weights["cls"] < 0.2
        assert weights["cls"] < min(weights["det"], weights["seg"])


def test_two_and_three_tasks_with_noise_give_valid_weights():
    for names in (["cls", "det"], ["cls", "det", "seg"]):
        trajectories = {
            name: curve for name, curve in noisy_three_tasks(200, seed=3).items() if name in names
        }
        coba = CoBa(names, history_length=40, warmup_steps=10)
        for weights in run(coba, trajectories, range(200)):
            values = np.array(list(weights.values()))
            assert np.isfinite(values).all()
            assert values.sum() == pytest.approx(1.0, abs=1e-12)
            assert values.min() >= 1 / (10 * len(names)) - 1e-12


def test_uniform_weights_during_warm_up_and_first_weights_at_call_w():
    trajectories = fast_and_slow(12)
    coba = CoBa(list(trajectories), history_length=10, warmup_steps=5)
    assert coba.weights == {"fast": 0.5, "slow": 0.5}
    for call in range(1, 5):
        weights = coba.update({name: float(curve[call - 1]) for name, curve in trajectories.items()})
        assert weights == {"fast": 0.5, "slow": 0.5}
        assert coba.is_warming_up and coba.last_scores is None and coba.num_updates == call
    assert coba.reference_losses == {"fast": pytest.approx(1.01), "slow": 1.0}
    weights = coba.update({name: float(curve[4]) for name, curve in trajectories.items()})
    assert not coba.is_warming_up
    assert coba.last_scores.update == 5
    assert weights["slow"] > weights["fast"]
    assert len(coba.state_dict()["ratio_history"]) == 4  # call 1 was the reference only


def test_flat_histories_give_no_nan():
    coba = CoBa(["a", "b", "c"], history_length=10, warmup_steps=3)
    for _ in range(30):
        weights = coba.update({"a": 1.0, "b": 2.0, "c": 0.5})
        assert list(weights.values()) == pytest.approx([1 / 3] * 3, abs=1e-15)
    scores = coba.last_scores
    assert scores.divergence_factor == 1.0
    assert list(scores.rcs.values()) == pytest.approx([1 / 3] * 3)
    assert list(scores.acs.values()) == pytest.approx([1 / 3] * 3)
    assert all(math.isfinite(value) for value in scores.to_log_dict().values())


def test_one_flat_task_among_falling_ones_and_a_single_task():
    t = np.arange(60, dtype=np.float64)
    coba = CoBa(["flat", "falling"], history_length=20, warmup_steps=5)
    for i in range(60):
        weights = coba.update({"flat": 1.0, "falling": float(np.exp(-i / 20))})
        assert all(math.isfinite(value) for value in weights.values())
    assert weights["flat"] > weights["falling"]  # slope 0 > negative slope: RCS favours the flat task

    single = CoBa(["only"], history_length=5, warmup_steps=3)
    for value in np.exp(-t / 10):
        assert single.update({"only": float(value)}) == {"only": 1.0}
    single_flat = CoBa(["only"], history_length=5, warmup_steps=3)
    for _ in range(10):
        assert single_flat.update({"only": 2.0}) == {"only": 1.0}


# --------------------------------------------------------------------------- zero losses


def test_zero_losses_are_left_out_of_the_fit():
    curve = 1.0 - 0.01 * np.arange(30)
    losses = curve.copy()
    losses[[12, 15, 16]] = 0.0
    default = CoBa(["a", "b"], history_length=40, warmup_steps=3)
    close_up = CoBa(["a", "b"], history_length=40, warmup_steps=3, close_up_zeros=True)
    official = OfficialCoBaReference(3, 40, tau=5.0, clamp=True)
    for i in range(30):
        update = {"a": float(losses[i]), "b": float(np.exp(-i / 10))}
        default.update(update)
        expected = official.update(np.array(list(update.values())))
        np.testing.assert_allclose(list(close_up.update(update).values()), expected, rtol=1e-9)
    # Kept at their true positions, the remaining points of a straight line still give its slope.
    assert default.last_scores.slopes["a"] == pytest.approx(-0.01, rel=1e-9)
    # The official close-up shifts later points left and makes the fall look steeper.
    assert close_up.last_scores.slopes["a"] < -0.0105
    assert default.zero_loss_counts == {"a": 3, "b": 0}


def test_window_slope():
    assert window_slope(np.array([3.0, 2.5, 2.0, 1.5])) == pytest.approx(-0.5)
    assert window_slope(np.array([1.0, 0.0, 3.0])) == pytest.approx(1.0)
    assert window_slope(np.array([1.0, 0.0, 3.0]), close_up_zeros=True) == pytest.approx(2.0)
    assert window_slope(np.array([0.0, 4.0])) == 0.0
    assert window_slope(np.array([])) == 0.0


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("save_after", [2, 7, 33, 70])
def test_resume_continues_bit_identically(tmp_path, save_after):
    trajectories = noisy_three_tasks(100, seed=1)
    uninterrupted = CoBa(list(trajectories), history_length=20, warmup_steps=8)
    interrupted = CoBa(list(trajectories), history_length=20, warmup_steps=8)
    run(uninterrupted, trajectories, range(save_after))
    run(interrupted, trajectories, range(save_after))
    torch.save(interrupted.state_dict(), tmp_path / "coba.pt")
    del interrupted

    resumed = CoBa(list(trajectories), history_length=20, warmup_steps=8)
    resumed.load_state_dict(torch.load(tmp_path / "coba.pt", weights_only=True))
    assert resumed.weights == uninterrupted.weights
    assert resumed.last_scores == uninterrupted.last_scores
    for i in range(save_after, 100):
        update = {name: float(curve[i]) for name, curve in trajectories.items()}
        assert resumed.update(update) == uninterrupted.update(update)
        assert resumed.last_scores == uninterrupted.last_scores
    assert resumed.state_dict() == uninterrupted.state_dict()


@pytest.fixture
def accelerator():
    accelerate = pytest.importorskip("accelerate")
    yield accelerate.Accelerator(cpu=True)
    # Accelerate's state is a process-wide singleton; leave none behind for other tests.
    reset_accelerate_state()


def test_accelerate_save_state_and_load_state_round_trip(tmp_path, accelerator):
    trajectories = fast_and_slow(40)
    coba = CoBa(list(trajectories), history_length=10, warmup_steps=4)
    scheduler = TaskScheduler(list(trajectories), temperature=0.5, seed=4)
    run(coba, trajectories, range(25))
    scheduler.set_weights(coba.weights)
    accelerator.register_for_checkpointing(coba, scheduler)
    accelerator.save_state(str(tmp_path / "checkpoint"))

    restored_coba = CoBa(list(trajectories), history_length=10, warmup_steps=4)
    restored_scheduler = TaskScheduler(list(trajectories), temperature=0.5, seed=4)
    resumed_accelerator = type(accelerator)(cpu=True)  # as in a restarted process: nothing registered yet
    resumed_accelerator.register_for_checkpointing(restored_coba, restored_scheduler)
    resumed_accelerator.load_state(str(tmp_path / "checkpoint"))
    assert restored_coba.state_dict() == coba.state_dict()
    assert isinstance(restored_coba.last_scores, CoBaScores)
    assert restored_scheduler.state_dict() == scheduler.state_dict()


def test_load_state_dict_checks_tasks_and_takes_hyperparameters_from_the_checkpoint(caplog):
    source = CoBa(["a", "b"], history_length=12, warmup_steps=4, tau=2.0)
    for i in range(9):
        source.update({"a": 1.0 / (1 + i), "b": 1.0})
    with pytest.raises(ValueError, match=r"saved for the tasks \['a', 'b'\].*has \['a', 'c'\]"):
        CoBa(["a", "c"]).load_state_dict(source.state_dict())

    target = CoBa(["a", "b"])  # defaults H=200, W=100, tau=5
    with caplog.at_level(logging.WARNING, logger="cadmtl.training.weighting.coba"):
        target.load_state_dict(source.state_dict())
    assert "tau=2.0 from the checkpoint replaces 5.0" in caplog.text
    assert (target.history_length, target.warmup_steps, target.tau) == (12, 4, 2.0)
    assert target.update({"a": 0.1, "b": 1.0}) == source.update({"a": 0.1, "b": 1.0})

    broken = source.state_dict()
    broken["ratio_history"] = broken["ratio_history"][:-1]
    with pytest.raises(ValueError, match="inconsistent: 10 updates but 8 stored ratio points"):
        CoBa(["a", "b"]).load_state_dict(broken)
    broken = source.state_dict()
    broken["max_slope_history"] = broken["max_slope_history"][1:]
    with pytest.raises(ValueError, match="10 updates but 6 stored max-ratio slopes and 7 stored task slopes"):
        CoBa(["a", "b"]).load_state_dict(broken)
    with pytest.raises(ValueError, match="missing the keys"):
        CoBa(["a", "b"]).load_state_dict({"version": 1})


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task_names": []}, "at least one task"),
        ({"task_names": "cls"}, "sequence of names"),
        ({"task_names": ["cls", "det", "cls"]}, r"unique, got duplicates \['cls'\]"),
        ({"task_names": ["cls", ""]}, "non-empty strings"),
        ({"warmup_steps": 2}, "warmup_steps must be an integer >= 3"),
        ({"warmup_steps": 10.0}, "warmup_steps must be an integer >= 3"),
        ({"history_length": 99}, r"history_length \(99\) must be >= warmup_steps \(100\)"),
        ({"tau": 0.0}, "tau must be a finite number > 0"),
        ({"tau": float("nan")}, "tau must be a finite number > 0"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    arguments = {"task_names": ["cls", "det"], **kwargs}
    with pytest.raises(ValueError, match=message):
        CoBa(**arguments)


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        ({"cls": 1.0}, r"missing \['det'\], unknown \[\]"),
        ({"cls": 1.0, "det": 1.0, "seg": 1.0}, r"missing \[\], unknown \['seg'\]"),
        ({"cls": float("nan"), "det": 1.0}, "task 'cls' must be finite and >= 0, got nan"),
        ({"cls": 1.0, "det": float("inf")}, "task 'det' must be finite and >= 0, got inf"),
        ({"cls": -0.5, "det": 1.0}, "task 'cls' must be finite and >= 0, got -0.5"),
        ({"cls": "1.0", "det": 1.0}, "task 'cls' must be a number"),
        ({"cls": None, "det": 1.0}, "task 'cls' must be a number"),
    ],
)
def test_update_rejects_bad_losses_and_keeps_its_state(losses, message):
    coba = CoBa(["cls", "det"], history_length=5, warmup_steps=3)
    coba.update({"cls": 1.0, "det": torch.tensor(2.0)})
    before = coba.state_dict()
    with pytest.raises(ValueError, match=message):
        coba.update(losses)
    assert coba.state_dict() == before


def test_reference_loss_must_be_positive():
    coba = CoBa(["cls", "det"], history_length=5, warmup_steps=3)
    with pytest.raises(ValueError, match=r"reference losses l_i\(0\), which must be > 0.*\{'det': 0.0\}"):
        coba.update({"cls": 1.0, "det": 0.0})
    assert coba.num_updates == 0 and coba.reference_losses is None


def test_log_dict_names_every_score():
    trajectories = fast_and_slow(10)
    coba = CoBa(list(trajectories), history_length=5, warmup_steps=3)
    run(coba, trajectories, range(10))
    logs = coba.last_scores.to_log_dict()
    assert logs["coba/weight/fast"] == coba.weights["fast"]
    assert {"coba/df", "coba/df_raw", "coba/slope/slow", "coba/rcs/fast", "coba/acs/slow"} <= set(logs)
