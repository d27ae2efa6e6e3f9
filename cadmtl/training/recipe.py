"""A training recipe: which tasks train, how their losses or gradients are weighted, how a step picks its tasks.

The paper's paradigms are presets of a task-weighting method and a task sampler:

| paradigm   | weighting | sampler                                   |
|------------|-----------|-------------------------------------------|
| `single`   | equal     | `single`: the one task                    |
| `base`     | equal     | `round_robin`: task `step % K`            |
| `adaptive` | coba      | `adaptive`: P(task) = softmax(w / T)      |

`--weighting NAME` replaces the preset's method (any registered one, e.g. `equal`, `coba`); with
`--all_tasks_per_step` every task runs each step and the sampler is `all`. Gradient-level methods need every
task in the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cadmtl.training.arguments import TrainingArguments
from cadmtl.training.weighting import WEIGHTINGS, TaskWeighting, build_weighting

PARADIGM_PRESETS: dict[str, tuple[str, str]] = {
    "single": ("equal", "single"),
    "base": ("equal", "round_robin"),
    "adaptive": ("coba", "adaptive"),
}


@dataclass(frozen=True)
class Recipe:
    """Resolved from the arguments: the weighting's registry name, the sampler mode, whether losses are scaled."""

    weighting: str
    sampler: str
    scale_losses: bool

    @property
    def every_task_each_step(self) -> bool:
        return self.sampler == "all"


def resolve_recipe(train_args: TrainingArguments) -> Recipe:
    """The recipe of ``--paradigm`` with ``--weighting`` / ``--all_tasks_per_step`` applied."""
    weighting, sampler = PARADIGM_PRESETS[train_args.paradigm]
    weighting = train_args.weighting or weighting
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; registered: {sorted(WEIGHTINGS)}")
    if train_args.all_tasks_per_step:
        sampler = "all"
    if WEIGHTINGS[weighting].needs_task_gradients and sampler != "all":
        raise ValueError(
            f"--weighting {weighting} combines per-task gradients: it needs every task in each step "
            "(add --all_tasks_per_step)."
        )
    return Recipe(
        weighting=weighting,
        sampler=sampler,
        scale_losses=train_args.all_tasks_per_step or train_args.reweight_sampled_loss,
    )


def weighting_options(name: str, train_args: TrainingArguments) -> dict[str, Any]:
    """The constructor options of weighting ``name`` taken from the training arguments."""
    if name == "coba":
        return {
            "history_length": train_args.coba_history_length,
            "warmup_steps": train_args.coba_warmup_steps,
            "tau": train_args.coba_tau,
            "clamp_divergence": train_args.coba_clamp_divergence,
        }
    if name == "pcgrad":
        return {"seed": train_args.seed}
    return {}


def build_recipe_weighting(recipe: Recipe, tasks: list[str], train_args: TrainingArguments) -> TaskWeighting:
    return build_weighting(recipe.weighting, tasks, **weighting_options(recipe.weighting, train_args))
