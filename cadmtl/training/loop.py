"""Multi-task training of CadMtl with CoBa and a synchronised task scheduler, on one CPU, one GPU or many.

    accelerate launch train_accelerate.py                         # the built-in CPU demo (tiny DINOv3, cad100k-mini)
    accelerate launch -m cadmtl.training.loop --config configs/cad100k_dinov3_vitb16_adaptive.yaml
    cadmtl train --num-processes 8 --accelerate-config configs/accelerate/multi_gpu.yaml --paradigm base

Paradigms (as in the CAD 100K paper) are presets of a task weighting and a task sampler
(`cadmtl.training.recipe`): `single` trains one task; `base` visits the tasks round robin with equal weights;
`adaptive` samples a task per step with P(task) = softmax(w / T), where w are CoBa's convergence-balanced weights,
updated from held-out losses every `coba_every` steps. `--weighting NAME` picks another registered method;
`--all_tasks_per_step` instead runs every task each step and sums the losses weighted by K * w. One
`TaskBalancer` (`cadmtl.training.balancer`) owns the weighting, the sampler and when each is fed.

Each optimizer step: draw the task (identical on every rank: a pure function of seed and step), take that task's
next batch, forward only its head, backward, drop the gradients of frozen early layers and unused heads, clip,
step. Checkpoints (`accelerator.save_state`) carry the weighting, the scheduler, the data positions and the RNG
states, so `--resume_from_checkpoint latest` continues exactly where a killed run stopped.

With `--eval_every N`, each evaluation adds a row to OUTPUT_DIR/results.csv and, when `--metric_for_best_model`
improves, writes OUTPUT_DIR/best/; `--patience K` stops after K evaluations without improvement, `--ema_decay D`
evaluates and ships an EMA of the weights, `--load_best_model_at_end` ships best/ (`cadmtl.training.best`).

The module reads top to bottom like Accelerate's examples: :func:`set_up` (accelerator, data, model, optimizer,
balancer, checkpoint), :func:`train` (each :func:`train_step`, logging, :func:`evaluate_and_keep_best`,
checkpoints), :func:`finish` (the shipped weights, final evaluation, OK / NG verdict, model/).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import IO, Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from cadmtl.data.sources import (
    LoaderSettings,
    TaskSource,
    TrainStreams,
    attach_label_maps,
    discover_sources,
    merged_labels,
)
from cadmtl.precision import resolve_mixed_precision
from cadmtl.training.arguments import DataArguments, ModelArguments, TrainingArguments, parse_arguments
from cadmtl.training.balancer import TaskBalancer
from cadmtl.training.best import (
    RESULTS_CSV,
    BestTracker,
    ResultsCsv,
    broadcast_value,
    build_ema,
    check_metric_for_best_model,
    default_greater_is_better,
    finish_weights,
    prepare_best_dir,
    results_row,
    save_best,
    selection_value,
)
from cadmtl.training.calibration import calibrate_and_report_verdict
from cadmtl.training.checkpoint import (
    LoopState,
    StatefulObjects,
    check_same_model,
    check_same_objects,
    find_checkpoint,
    register_stateful,
    save_checkpoint,
)
from cadmtl.training.finish import FinishSettings, evaluate_all, final_results, model_card_data, save_run
from cadmtl.training.log_window import LogWindow
from cadmtl.training.optim import (
    build_param_groups,
    early_backbone_parameters,
    freeze_batch_norm_statistics,
    freeze_for_whole_run,
    resolve_freeze_blocks,
)
from cadmtl.training.recipe import Recipe, resolve_recipe
from cadmtl.training.setup import build_model, class_candidates, ensure_dataset, make_trackers
from cadmtl.training.step import StepOutcome, StepSettings, count_nonfinite, training_step
from dataset_scripts.schema import TASKS
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel
from modeling_cadmtl.configuration_cadmtl import backbone_normalization

logger = logging.getLogger("cadmtl.training.loop")


@dataclass
class RunData:
    """The data side of a run: its tasks, their dataset configs and label sets, the loaders, the train streams."""

    tasks: list[str]
    configs_by_task: dict[str, list[str]]
    sources: dict[str, list[TaskSource]]
    labels: dict[str, list[str]]
    image_sizes: dict[str, int]
    eval_settings: LoaderSettings
    streams: TrainStreams
    candidates: dict[str, torch.Tensor]


@dataclass
class Run:
    """Everything :func:`set_up` builds, and the counters (``state``) the loop advances."""

    model_args: ModelArguments
    data_args: DataArguments
    train_args: TrainingArguments
    accelerator: Accelerator
    data: RunData
    model: torch.nn.Module  # prepared: wrapped in DDP when distributed
    unwrapped: CadMtlModel
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    frozen: list[torch.nn.Parameter]
    balancer: TaskBalancer
    step_settings: StepSettings
    settings: FinishSettings
    processor: CadMtlImageProcessor
    state: LoopState
    tracker: BestTracker
    results_csv: ResultsCsv
    checkpoint_objects: StatefulObjects | None = None
    resumed: bool = False

    @property
    def eval_model(self) -> torch.nn.Module:
        """What evaluations, best/ and model/ use: the EMA of the weights when on."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def output_dir(self) -> Path:
        return self.settings.output_dir


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, evaluate and save a model; returns the summary written to OUTPUT_DIR/eval_results.json."""
    model_args, data_args, train_args = parse_arguments(argv)
    run = set_up(model_args, data_args, train_args)
    started = time.perf_counter()
    train(run)
    return finish(run, started)


# -------------------------------------------------------------------------------------------------- set-up
def make_accelerator(train_args: TrainingArguments, recipe: Recipe) -> Accelerator:
    """The Accelerator of the run (DDP settings, mixed precision, accumulation, trackers) and the logging."""
    output_dir = Path(train_args.output_dir)
    ddp_kwargs = DistributedDataParallelKwargs(
        find_unused_parameters=train_args.ddp_unused == "find_unused" and not recipe.every_task_each_step,
        broadcast_buffers=False,  # the only buffers are RoPE constants
    )
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(train_args.mixed_precision),
        gradient_accumulation_steps=train_args.gradient_accumulation_steps,
        log_with=make_trackers(train_args) or None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        kwargs_handlers=[ddp_kwargs],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    return accelerator


def load_data(
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: TrainingArguments,
    accelerator: Accelerator,
) -> tuple[RunData, CadMtlModel]:
    """The trained tasks' dataset configs and label sets, the model built for them, the loaders' settings."""
    tasks = [train_args.single_task] if train_args.paradigm == "single" else list(TASKS)
    configs_by_task = {task: getattr(data_args, f"{task}_configs") for task in tasks}
    configs_by_task = {task: configs for task, configs in configs_by_task.items() if configs}
    if not configs_by_task:
        raise ValueError(
            f"No dataset configs for the tasks {tasks}: set --cls_configs / --det_configs / --seg_configs."
        )
    tasks = list(configs_by_task)
    check_metric_for_best_model(
        train_args.metric_for_best_model, [c for configs in configs_by_task.values() for c in configs]
    )
    sources = discover_sources(data_args.dataset, configs_by_task, data_args.train_split)
    model = build_model(
        model_args, {task: merged_labels(task_sources) for task, task_sources in sources.items()}
    )
    labels = {task: model.config.labels_for(task) for task in tasks}
    for task in tasks:
        attach_label_maps(sources[task], labels[task])
    image_sizes = {task: getattr(data_args, f"{task}_image_size") for task in TASKS}
    model.config.image_sizes = {
        **(model.config.image_sizes or {}),
        **{task: image_sizes[task] for task in tasks},
    }
    image_mean, image_std = backbone_normalization(model.config.backbone_config)
    loader_settings = LoaderSettings(
        image_mean=tuple(image_mean),
        image_std=tuple(image_std),
        dataset=data_args.dataset,
        split=data_args.train_split,
        image_sizes=image_sizes,
        batch_size=data_args.batch_size,
        num_workers=data_args.num_workers,
        shuffle_buffer=data_args.shuffle_buffer,
        seed=train_args.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        task_batch_sizes={
            task: size for task in tasks if (size := getattr(data_args, f"{task}_batch_size")) is not None
        },
    )
    data = RunData(
        tasks=tasks,
        configs_by_task=configs_by_task,
        sources=sources,
        labels=labels,
        image_sizes=image_sizes,
        eval_settings=LoaderSettings(**{**asdict(loader_settings), "split": data_args.eval_split}),
        streams=TrainStreams(sources, loader_settings),
        candidates=class_candidates(sources, len(model.config.cls_labels), accelerator.device)
        if train_args.cls_domain_conditioning
        else {},
    )
    return data, model


def make_optimizer(model: CadMtlModel, train_args: TrainingArguments) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the layer-decayed parameter groups, and its warm-up + cosine learning-rate schedule."""
    param_groups = build_param_groups(
        model,
        train_args.learning_rate,
        train_args.weight_decay,
        train_args.layer_decay,
        train_args.head_lr_multiplier,
    )
    for group in param_groups:
        group.pop("names")
    optimizer = torch.optim.AdamW(param_groups, lr=train_args.learning_rate, fused=torch.cuda.is_available())
    return optimizer, get_cosine_schedule_with_warmup(
        optimizer, train_args.warmup_steps, train_args.max_steps
    )


def set_up(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments) -> Run:
    """Everything the first step needs, restored from a checkpoint when resuming."""
    recipe = resolve_recipe(train_args)
    accelerator = make_accelerator(train_args, recipe)
    set_seed(train_args.seed)
    ensure_dataset(data_args, accelerator)
    data, model = load_data(model_args, data_args, train_args, accelerator)
    frozen = early_backbone_parameters(model, resolve_freeze_blocks(model, train_args.freeze_backbone_layers))
    if train_args.freeze_steps >= train_args.max_steps:
        freeze_for_whole_run(frozen)
        frozen = []
    if train_args.freeze_batch_norm:
        logger.info(
            "%d backbone BatchNorm layers keep their statistics", freeze_batch_norm_statistics(model.backbone)
        )
    if train_args.channels_last:
        model.to(memory_format=torch.channels_last)
    # The EMA copies the plain model, before compilation and DDP; evaluations, best/ and model/ then use it.
    ema = build_ema(model, train_args.ema_decay) if train_args.ema_decay else None
    if train_args.torch_compile:
        model.backbone.compile(dynamic=False)  # one graph per input shape (DINOv3 fails with dynamic shapes)
    optimizer, lr_scheduler = make_optimizer(model, train_args)
    balancer = TaskBalancer.from_recipe(recipe, data.tasks, train_args)
    # The LR scheduler is not prepared: Accelerate would step it once per process, but max_steps counts the
    # optimizer steps of each process.
    model, optimizer = accelerator.prepare(model, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
    metric = train_args.metric_for_best_model
    greater_is_better = train_args.greater_is_better
    run = Run(
        model_args=model_args,
        data_args=data_args,
        train_args=train_args,
        accelerator=accelerator,
        data=data,
        model=model,
        unwrapped=accelerator.unwrap_model(model),
        ema=ema,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        frozen=frozen,
        balancer=balancer,
        step_settings=StepSettings(
            accumulation_steps=train_args.gradient_accumulation_steps,
            max_grad_norm=train_args.max_grad_norm,
            zero_touch=train_args.ddp_unused == "zero_touch",
        ),
        settings=replace(
            FinishSettings.from_arguments(
                model_args, data_args, train_args, data.configs_by_task, balancer.name, balancer.temperature
            ),
            mixed_precision=accelerator.mixed_precision,  # what "auto" resolved to, for the model card
        ),
        processor=CadMtlImageProcessor(
            size={"height": data.image_sizes["det"], "width": data.image_sizes["det"]},
            task_sizes={t: data.image_sizes[t] for t in data.tasks},
            image_mean=list(data.eval_settings.image_mean),
            image_std=list(data.eval_settings.image_std),
        ),
        state=LoopState(),
        tracker=BestTracker(
            metric,
            greater_is_better if greater_is_better is not None else default_greater_is_better(metric),
            train_args.patience,
        ),
        results_csv=ResultsCsv(Path(train_args.output_dir) / RESULTS_CSV),
    )
    resume(run)
    balancer.load_held_out(
        data.sources, data.eval_settings, train_args.coba_val_batches, train_args.coba_val_batch_size
    )
    start_logging(run)
    return run


def resume(run: Run) -> None:
    """Register every stateful object for checkpointing, then load the checkpoint to resume from, if any."""
    train_args, accelerator = run.train_args, run.accelerator
    run.checkpoint_objects = register_stateful(
        {
            "lr_scheduler": run.lr_scheduler,
            **run.balancer.checkpoint_objects(),
            "loop": run.state,
            "data_streams": run.data.streams,
            **({"best": run.tracker, "results": run.results_csv} if train_args.eval_every else {}),
            **({"ema": run.ema} if run.ema is not None else {}),
        },
    )
    checkpoint = find_checkpoint(train_args.resume_from_checkpoint, run.output_dir)
    if checkpoint is not None:
        check_same_model(checkpoint, run.unwrapped)
        check_same_objects(checkpoint, run.checkpoint_objects)
        accelerator.load_state(str(checkpoint))
        run.checkpoint_objects.load(checkpoint)  # tensors and plain values, weights_only=True
        logger.info("resumed from %s at step %d", checkpoint, run.state.step)
        run.resumed = True


def start_logging(run: Run) -> None:
    """The trackers' run config, the first log line, and (with evaluations) results.csv and best/ made ready."""
    accelerator, train_args, data = run.accelerator, run.train_args, run.data
    config = {"model": asdict(run.model_args), "data": asdict(run.data_args), "training": asdict(train_args)}
    accelerator.init_trackers("cadmtl", config=config)
    (run.output_dir / "logs").mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        logger.info(
            "training %s (weighting %s, sampler %s) on %s: tasks %s, %d processes, %s, %d steps",
            train_args.paradigm,
            run.balancer.name,
            run.balancer.sampler,
            run.data_args.dataset,
            {t: [s.config for s in data.sources[t]] for t in data.tasks},
            accelerator.num_processes,
            accelerator.mixed_precision,
            train_args.max_steps,
        )
    if train_args.eval_every and accelerator.is_main_process:
        run.results_csv.open(run.state.step if run.resumed else None)
        prepare_best_dir(run.output_dir, run.tracker, resumed=run.resumed)


# ---------------------------------------------------------------------------------------------------- loop
def train(run: Run) -> None:
    """Optimizer steps until max_steps or early stopping: log, evaluate and keep the best, checkpoint."""
    accelerator, state, train_args = run.accelerator, run.state, run.train_args
    progress = tqdm(
        total=train_args.max_steps,
        initial=state.step,
        desc="training",
        disable=not accelerator.is_local_main_process,
    )
    window = LogWindow(accelerator.num_processes)
    # Each task's latest training loss on this rank, for results.csv (NaN until the task's first step).
    last_losses = {task: torch.tensor(float("nan")) for task in run.data.tasks}
    stop = train_args.eval_every > 0 and run.tracker.should_stop  # a checkpoint taken when patience ran out
    # Each rank records its task sequence: every rank must draw the same task at the same step.
    with open(run.output_dir / "logs" / f"tasks_rank{accelerator.process_index}.txt", "a") as task_log:
        while state.step < train_args.max_steps and not stop:
            outcome = train_step(run, window, task_log)
            last_losses.update({task: values[-1] for task, values in outcome.task_losses.items()})
            state.step += 1
            progress.update(1)
            if state.step % train_args.logging_steps == 0 or state.step == train_args.max_steps:
                record = window.record(
                    lr=run.lr_scheduler.get_last_lr()[-1],
                    nonfinite_steps=state.nonfinite_steps,
                    weighting=run.balancer.weighting,
                    probabilities=run.balancer.probabilities,
                )
                accelerator.log(record, step=state.step)
                progress.set_postfix({k[5:]: f"{v:.3f}" for k, v in record.items() if k.startswith("loss/")})
            # Evaluate before checkpointing, so a checkpoint holds this evaluation's best / patience state.
            if train_args.eval_every and state.step % train_args.eval_every == 0:
                stop = evaluate_and_keep_best(run, last_losses)
            if train_args.save_every and state.step % train_args.save_every == 0:
                save_checkpoint(
                    accelerator,
                    run.unwrapped,
                    run.output_dir,
                    state.step,
                    run.checkpoint_objects,
                    train_args.save_total_limit,
                )
    if stop and state.step < train_args.max_steps:
        logger.info("early stopping at step %d: %s", state.step, run.tracker.stop_reason())
    progress.close()


def train_step(run: Run, window: LogWindow, task_log: IO[str]) -> StepOutcome:
    """One optimizer step at ``run.state.step``, with the balancer called before and after it."""
    accelerator, balancer, state, train_args = run.accelerator, run.balancer, run.state, run.train_args
    step = state.step
    window.add_weighting_time(balancer.before_step(step, run.model, accelerator, run.data.candidates))
    step_tasks = balancer.tasks_for(step)
    outcome = training_step(
        accelerator,
        run.model,
        run.optimizer,
        run.lr_scheduler,
        run.data.streams.next_batch,
        step_tasks,
        balancer,
        run.step_settings,
        frozen=run.frozen if step < train_args.freeze_steps else (),
        candidates=run.data.candidates,
    )
    if count_nonfinite(
        state,
        outcome.stepped,
        step,
        step_tasks,
        train_args.max_consecutive_nonfinite,
        run.output_dir / "checkpoints",
    ):
        logger.warning(
            "step %d: non-finite loss or gradient (%s), step skipped (%d in a row)",
            step,
            step_tasks,
            state.consecutive_nonfinite,
        )
    if run.ema is not None and outcome.stepped:
        run.ema.update_parameters(run.unwrapped)
    balancer.after_step(step, outcome, accelerator)
    task_log.write(f"{step} {','.join(step_tasks)}\n")
    window.add_step(outcome.task_losses, outcome.images)
    return outcome


def evaluate_and_keep_best(run: Run, last_losses: dict[str, torch.Tensor]) -> bool:
    """Evaluate on the validation split: log it, add a results.csv row, save best/ on improvement. Returns
    whether patience ran out."""
    accelerator, tracker, step, data = run.accelerator, run.tracker, run.state.step, run.data
    results = evaluate_all(
        run.eval_model, data.sources, data.eval_settings, data.labels, run.settings, accelerator
    )
    fitness = broadcast_value(accelerator, selection_value(results, tracker.metric))
    is_best = tracker.update(step, fitness)
    accelerator.log(
        {
            **{f"eval/{c}/{k}": v for c, r in results.items() for k, v in r["metrics"].items()},
            "eval/fitness": fitness,
        },
        step=step,
    )
    if accelerator.is_main_process:
        losses = {task: loss.item() for task, loss in last_losses.items()}
        run.results_csv.append(
            results_row(step, run.results_csv.elapsed(), losses, results, fitness, is_best)
        )
    if is_best:
        # best/'s card reports the validation metrics of this evaluation.
        card = model_card_data(replace(run.settings, test_split=None), results, step)
        info = {
            "step": step,
            "metric_for_best_model": tracker.metric,
            "value": fitness,
            "greater_is_better": tracker.greater_is_better,
            "ema": run.ema is not None,
            "metrics": {c: r["metrics"] for c, r in results.items()},
        }
        save_best(accelerator, run.eval_model, run.output_dir, run.processor, card, info)
        logger.info("step %d: new best %s %.6g, saved best/", step, tracker.metric, fitness)
    return tracker.should_stop


# -------------------------------------------------------------------------------------------------- finish
def finish(run: Run, started: float) -> dict[str, Any]:
    """The shipped weights, the final evaluation, the OK / NG verdict, and model/ with its card and results."""
    accelerator, data, state = run.accelerator, run.data, run.state
    shipped = finish_weights(
        accelerator, run.unwrapped, run.ema, run.output_dir, run.train_args.load_best_model_at_end
    )
    logger.info("final evaluation and model/ use %s", shipped)
    results = final_results(
        run.model, data.sources, data.eval_settings, data.labels, run.settings, accelerator
    )
    accelerator.log(
        {f"final/{c}/{k}": v for c, r in results.items() for k, v in r["metrics"].items()}, step=state.step
    )
    summary = {
        "paradigm": run.settings.paradigm,
        "weighting": run.balancer.summary(),
        "steps": state.step,
        "nonfinite_steps": state.nonfinite_steps,
        "train_seconds": time.perf_counter() - started,
        "results": results,
    }
    # The OK / NG threshold, calibrated on validation and stored in the config before it is saved.
    summary["verdict"] = calibrate_and_report_verdict(
        run.model, data.sources, data.eval_settings, run.settings, accelerator
    )
    accelerator.wait_for_everyone()
    card_data = model_card_data(run.settings, results, state.step)
    save_run(accelerator, run.model, summary, card_data, run.processor, run.settings)
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
