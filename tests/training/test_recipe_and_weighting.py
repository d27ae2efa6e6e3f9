"""Paradigm presets, --weighting, the weighting registry and CoBa behind the interface."""

from __future__ import annotations

import pytest

from cadmtl.training.arguments import TrainingArguments
from cadmtl.training.recipe import build_recipe_weighting, resolve_recipe
from cadmtl.training.weighting import (
    WEIGHTINGS,
    CoBa,
    CoBaWeighting,
    EqualWeighting,
    TaskWeighting,
    build_weighting,
    register_weighting,
)


@pytest.mark.parametrize(
    ("paradigm", "weighting", "sampler"),
    [("single", "equal", "single"), ("base", "equal", "round_robin"), ("adaptive", "coba", "adaptive")],
)
def test_paradigms_are_presets_of_a_weighting_and_a_sampler(paradigm, weighting, sampler) -> None:
    recipe = resolve_recipe(TrainingArguments(paradigm=paradigm))
    assert (recipe.weighting, recipe.sampler, recipe.scale_losses) == (weighting, sampler, False)


def test_weighting_overrides_the_preset_and_all_tasks_sets_the_sampler() -> None:
    recipe = resolve_recipe(TrainingArguments(paradigm="base", weighting="coba", all_tasks_per_step=True))
    assert (recipe.weighting, recipe.sampler, recipe.scale_losses) == ("coba", "all", True)
    assert recipe.every_task_each_step
    assert resolve_recipe(TrainingArguments(reweight_sampled_loss=True)).scale_losses


def test_gradient_methods_need_every_task_and_unknown_names_are_listed() -> None:
    with pytest.raises(
        ValueError, match=r"--weighting pcgrad combines per-task gradients.*--all_tasks_per_step"
    ):
        resolve_recipe(TrainingArguments(weighting="pcgrad"))
    with pytest.raises(
        ValueError, match=r"unknown weighting 'gradnorm'; registered: \['aligned_mtl', 'cagrad'"
    ):
        resolve_recipe(TrainingArguments(weighting="gradnorm"))


def test_every_method_is_registered_under_its_name() -> None:
    assert {"equal", "coba", "pcgrad", "cagrad", "aligned_mtl", "famo"} <= set(WEIGHTINGS)
    for name, cls in WEIGHTINGS.items():
        assert cls.name == name and issubclass(cls, TaskWeighting)


def test_recipe_weighting_takes_the_coba_arguments() -> None:
    arguments = TrainingArguments(coba_history_length=12, coba_warmup_steps=4, coba_tau=2.0)
    weighting = build_recipe_weighting(resolve_recipe(arguments), ["cls", "det"], arguments)
    assert isinstance(weighting, CoBaWeighting)
    assert (weighting.coba.history_length, weighting.coba.warmup_steps, weighting.coba.tau) == (12, 4, 2.0)


def test_equal_weighting_is_uniform_and_stateless() -> None:
    weighting = build_weighting("equal", ["a", "b", "c", "d"])
    assert weighting.weights == {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}
    assert weighting.update(10) == weighting.weights and weighting.state_dict() == {}
    assert weighting.log_dict() == {"weight/a": 0.25, "weight/b": 0.25, "weight/c": 0.25, "weight/d": 0.25}
    with pytest.raises(NotImplementedError, match="EqualWeighting is a loss-level method"):
        weighting.combine_gradients(None, {})


def test_coba_weighting_equals_coba_and_round_trips() -> None:
    losses = [{"cls": 1 / (1 + s), "det": 1 / (1 + 0.1 * s)} for s in range(12)]
    plain, wrapped = (
        CoBa(["cls", "det"], history_length=6, warmup_steps=3),
        CoBaWeighting(["cls", "det"], history_length=6, warmup_steps=3),
    )
    for step, values in enumerate(losses[:8]):
        assert wrapped.update(step, values) == plain.update(values)
    resumed = CoBaWeighting(["cls", "det"], history_length=6, warmup_steps=3)
    resumed.load_state_dict(wrapped.state_dict())
    for step, values in enumerate(losses[8:], start=8):
        assert resumed.update(step, values) == wrapped.update(step, values)
    assert "weight/cls" in wrapped.log_dict() and wrapped.needs_held_out_losses
    with pytest.raises(
        ValueError, match=r"CoBa needs held-out losses of \['cls', 'det'\] at step 3, got None"
    ):
        wrapped.update(3)


def test_task_names_are_validated_once_for_every_owner() -> None:
    from cadmtl.training.scheduler import TaskScheduler

    for make, owner in ((EqualWeighting, "EqualWeighting"), (TaskScheduler, "TaskScheduler"), (CoBa, "CoBa")):
        with pytest.raises(ValueError, match=f"{owner} needs at least one task"):
            make([])
        with pytest.raises(ValueError, match=r"task names must be unique, got duplicates \['a'\]"):
            make(["a", "a"])
        with pytest.raises(ValueError, match="task_names must be a sequence of names, got the string 'ab'"):
            make("ab")


def test_registry_refuses_a_name_taken_by_another_class() -> None:
    class Other(TaskWeighting):
        name = "equal"

    with pytest.raises(ValueError, match="weighting name 'equal' is taken by EqualWeighting"):
        register_weighting(Other)
    with pytest.raises(ValueError, match="unknown weighting 'nope'"):
        build_weighting("nope", ["a"])
