"""Multi-task training of CadMtl with CoBa and a synchronised task scheduler, on one CPU, one GPU or many.

    accelerate launch train_accelerate.py                         # the built-in CPU demo (tiny DINOv3, cad100k-mini)
    accelerate launch train_accelerate.py --config configs/cad100k_vitb16_adaptive.yaml
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml train_accelerate.py --config ... --paradigm base

Paradigms (as in the CAD 100K paper) are presets of a task weighting and a task sampler
(`cadmtl.training.recipe`): `single` trains one task; `base` visits the tasks round robin with equal weights;
`adaptive` samples a task per step with P(task) = softmax(w / T), where w are CoBa's convergence-balanced weights,
updated from held-out losses every `coba_every` steps. `--weighting NAME` picks another registered method;
`--all_tasks_per_step` instead runs every task each step and sums the losses weighted by K * w.

Each optimizer step: draw the task (identical on every rank: a pure function of seed and step), take that task's
next batch, forward only its head, backward, drop the gradients of frozen early layers and unused heads, clip,
step. Checkpoints (`accelerator.save_state`) carry CoBa, the scheduler, the data positions and the RNG states, so
`--resume_from_checkpoint latest` continues exactly where a killed run stopped.

With `--eval_every N`, each evaluation adds a row to OUTPUT_DIR/results.csv and, when `--metric_for_best_model`
improves, writes OUTPUT_DIR/best/; `--patience K` stops after K evaluations without improvement, `--ema_decay D`
evaluates and ships an EMA of the weights, `--load_best_model_at_end` ships best/ (`cadmtl.training.best`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from cadmtl.data.sources import (
    LoaderSettings,
    TrainStreams,
    attach_label_maps,
    discover_sources,
    held_out_batches,
    merged_labels,
)
from cadmtl.training.arguments import parse_arguments
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
from cadmtl.training.checkpoint import (
    LoopState,
    check_same_model,
    check_same_objects,
    find_checkpoint,
    register_stateful,
    save_checkpoint,
)
from cadmtl.training.finish import evaluate_all, final_results, model_card_data, save_run
from cadmtl.training.log_window import LogWindow
from cadmtl.training.optim import build_param_groups, early_backbone_parameters, resolve_freeze_blocks
from cadmtl.training.recipe import build_recipe_weighting, resolve_recipe
from cadmtl.training.scheduler import TaskScheduler
from cadmtl.training.setup import build_model, class_candidates, ensure_dataset, make_trackers
from cadmtl.training.step import (
    StepSettings,
    count_nonfinite,
    held_out_losses,
    reduced_task_losses,
    training_step,
)
from cadmtl.training.verdict import calibrate_and_report_verdict
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel
from modeling_cadmtl.configuration_cadmtl import backbone_normalization

logger = logging.getLogger("train_accelerate")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, train_args = parse_arguments(argv)
    recipe = resolve_recipe(train_args)
    output_dir = Path(train_args.output_dir)
    ddp_kwargs = DistributedDataParallelKwargs(
        find_unused_parameters=train_args.ddp_unused == "find_unused" and not recipe.every_task_each_step,
        broadcast_buffers=False,  # the only buffers are RoPE constants
    )
    accelerator = Accelerator(
        mixed_precision=train_args.mixed_precision,
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
    set_seed(train_args.seed)
    ensure_dataset(data_args, accelerator)

    # ------------------------------------------------------------------------------------------------ data
    tasks = [train_args.single_task] if train_args.paradigm == "single" else ["cls", "det", "seg"]
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
    image_sizes = {
        "cls": data_args.cls_image_size,
        "det": data_args.det_image_size,
        "seg": data_args.seg_image_size,
    }
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
    eval_settings = LoaderSettings(**{**asdict(loader_settings), "split": data_args.eval_split})
    streams = TrainStreams(sources, loader_settings)
    candidates = (
        class_candidates(sources, len(model.config.cls_labels), accelerator.device)
        if train_args.cls_domain_conditioning
        else {}
    )

    # ------------------------------------------------------------------------------- optimisation state
    frozen = early_backbone_parameters(model, resolve_freeze_blocks(model, train_args.freeze_backbone_layers))
    # The EMA copies the plain model, before compilation and DDP; evaluations, best/ and model/ then use it.
    ema = build_ema(model, train_args.ema_decay) if train_args.ema_decay else None
    if train_args.torch_compile:
        model.backbone.compile(dynamic=False)  # one graph per input shape (DINOv3 fails with dynamic shapes)
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
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, train_args.warmup_steps, train_args.max_steps)
    weighting = build_recipe_weighting(recipe, tasks, train_args)
    task_scheduler = TaskScheduler(
        tasks,
        temperature=train_args.temperature or 1.0 / len(tasks),
        seed=train_args.seed,
        mode="round_robin" if recipe.sampler == "all" else recipe.sampler,
    )
    state = LoopState()
    # The LR scheduler is not prepared: Accelerate would step it once per process, but max_steps counts the
    # optimizer steps of each process.
    model, optimizer = accelerator.prepare(model, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
    tracker = BestTracker(
        train_args.metric_for_best_model,
        train_args.greater_is_better
        if train_args.greater_is_better is not None
        else default_greater_is_better(train_args.metric_for_best_model),
        train_args.patience,
    )
    results_csv = ResultsCsv(output_dir / RESULTS_CSV)
    checkpoint_objects = register_stateful(
        accelerator,
        {
            "lr_scheduler": lr_scheduler,
            "weighting": weighting,
            "task_scheduler": task_scheduler,
            "loop": state,
            "data_streams": streams,
            **({"best": tracker, "results": results_csv} if train_args.eval_every else {}),
            **({"ema": ema} if ema is not None else {}),
        },
    )
    unwrapped: CadMtlModel = accelerator.unwrap_model(model)
    eval_model = ema.module if ema is not None else model
    checkpoint = find_checkpoint(train_args.resume_from_checkpoint, output_dir)
    if checkpoint is not None:
        check_same_model(checkpoint, unwrapped)
        check_same_objects(checkpoint, checkpoint_objects)
        accelerator.load_state(str(checkpoint))
        logger.info("resumed from %s at step %d", checkpoint, state.step)
    held_out = (
        {
            task: held_out_batches(
                sources[task], eval_settings, train_args.coba_val_batches, train_args.coba_val_batch_size
            )
            for task in tasks
        }
        if weighting.needs_held_out_losses
        else {}
    )
    step_settings = StepSettings(
        accumulation_steps=train_args.gradient_accumulation_steps,
        max_grad_norm=train_args.max_grad_norm,
        scale_losses=recipe.scale_losses,
        num_tasks=len(tasks),
        zero_touch=train_args.ddp_unused == "zero_touch",
    )

    run_config = {"model": asdict(model_args), "data": asdict(data_args), "training": asdict(train_args)}
    accelerator.init_trackers("cadmtl", config=run_config)
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        logger.info(
            "training %s (weighting %s, sampler %s) on %s: tasks %s, %d processes, %s, %d steps",
            train_args.paradigm,
            recipe.weighting,
            recipe.sampler,
            data_args.dataset,
            {t: [s.config for s in sources[t]] for t in tasks},
            accelerator.num_processes,
            accelerator.mixed_precision,
            train_args.max_steps,
        )

    processor = CadMtlImageProcessor(
        size={"height": image_sizes["det"], "width": image_sizes["det"]},
        task_sizes={t: image_sizes[t] for t in tasks},
        image_mean=image_mean,
        image_std=image_std,
    )
    if train_args.eval_every and accelerator.is_main_process:
        results_csv.open(state.step if checkpoint is not None else None)
        prepare_best_dir(output_dir, tracker, resumed=checkpoint is not None)

    # ---------------------------------------------------------------------------------------------- loop
    progress = tqdm(
        total=train_args.max_steps,
        initial=state.step,
        desc="training",
        disable=not accelerator.is_local_main_process,
    )
    started = time.perf_counter()
    window = LogWindow(accelerator.num_processes)
    # Each rank records its task sequence: every rank must draw the same task at the same step.
    task_log_path = output_dir / "logs" / f"tasks_rank{accelerator.process_index}.txt"
    # Each task's latest training loss on this rank, for results.csv (NaN until the task's first step).
    last_losses = {task: torch.tensor(float("nan")) for task in tasks}
    stop = train_args.eval_every > 0 and tracker.should_stop  # a checkpoint taken when patience ran out
    with open(task_log_path, "a") as task_log:
        while state.step < train_args.max_steps and not stop:
            step = state.step
            if weighting.needs_held_out_losses and step % train_args.coba_every == 0 and held_out:
                update_started = time.perf_counter()
                losses = held_out_losses(model, held_out, accelerator, candidates)
                task_scheduler.set_weights(weighting.update(step, losses))
                window.add_weighting_time(time.perf_counter() - update_started)
            step_tasks = tasks if recipe.every_task_each_step else [task_scheduler.sample(step)]
            outcome = training_step(
                accelerator,
                model,
                optimizer,
                lr_scheduler,
                streams.next_batch,
                step_tasks,
                weighting,
                step_settings,
                frozen=frozen if step < train_args.freeze_steps else (),
                candidates=candidates,
            )
            if count_nonfinite(
                state,
                outcome.stepped,
                step,
                step_tasks,
                train_args.max_consecutive_nonfinite,
                output_dir / "checkpoints",
            ):
                logger.warning(
                    "step %d: non-finite loss or gradient (%s), step skipped (%d in a row)",
                    step,
                    step_tasks,
                    state.consecutive_nonfinite,
                )
            if ema is not None and outcome.stepped:
                ema.update_parameters(unwrapped)
            last_losses.update({task: values[-1] for task, values in outcome.task_losses.items()})
            if weighting.needs_train_losses and outcome.stepped:
                weighting.observe_train_losses(step, reduced_task_losses(accelerator, outcome))
            task_log.write(f"{step} {','.join(step_tasks)}\n")
            window.add_step(outcome.task_losses, outcome.images)
            state.step += 1
            progress.update(1)

            if state.step % train_args.logging_steps == 0 or state.step == train_args.max_steps:
                record = window.record(
                    lr=lr_scheduler.get_last_lr()[-1],
                    nonfinite_steps=state.nonfinite_steps,
                    weighting=weighting,
                    probabilities=task_scheduler.probabilities,
                )
                accelerator.log(record, step=state.step)
                progress.set_postfix({k[5:]: f"{v:.3f}" for k, v in record.items() if k.startswith("loss/")})
            # Evaluate before checkpointing, so a checkpoint holds this evaluation's best / patience state.
            if train_args.eval_every and state.step % train_args.eval_every == 0:
                results = evaluate_all(
                    eval_model, sources, eval_settings, labels, data_args, train_args, accelerator
                )
                fitness = broadcast_value(accelerator, selection_value(results, tracker.metric))
                is_best = tracker.update(state.step, fitness)
                accelerator.log(
                    {
                        **{f"eval/{c}/{k}": v for c, r in results.items() for k, v in r["metrics"].items()},
                        "eval/fitness": fitness,
                    },
                    step=state.step,
                )
                if accelerator.is_main_process:
                    losses = {task: loss.item() for task, loss in last_losses.items()}
                    results_csv.append(
                        results_row(state.step, results_csv.elapsed(), losses, results, fitness, is_best)
                    )
                if is_best:
                    # best/'s card reports the validation metrics of this evaluation.
                    card = model_card_data(
                        model_args,
                        replace(data_args, test_split=None),
                        train_args,
                        configs_by_task,
                        results,
                        state.step,
                        weighting,
                        task_scheduler.temperature,
                    )
                    info = {
                        "step": state.step,
                        "metric_for_best_model": tracker.metric,
                        "value": fitness,
                        "greater_is_better": tracker.greater_is_better,
                        "ema": ema is not None,
                        "metrics": {c: r["metrics"] for c, r in results.items()},
                    }
                    save_best(accelerator, eval_model, output_dir, processor, card, info)
                    logger.info("step %d: new best %s %.6g, saved best/", state.step, tracker.metric, fitness)
                stop = tracker.should_stop
            if train_args.save_every and state.step % train_args.save_every == 0:
                save_checkpoint(
                    accelerator,
                    unwrapped,
                    output_dir,
                    state.step,
                    checkpoint_objects,
                    train_args.save_total_limit,
                )
    if stop and state.step < train_args.max_steps:
        logger.info("early stopping at step %d: %s", state.step, tracker.stop_reason())
    progress.close()
    shipped = finish_weights(accelerator, unwrapped, ema, output_dir, train_args.load_best_model_at_end)
    logger.info("final evaluation and model/ use %s", shipped)

    # --------------------------------------------------------------------------------- evaluate and save
    results = final_results(model, sources, eval_settings, labels, data_args, train_args, accelerator)
    accelerator.log(
        {f"final/{c}/{k}": v for c, r in results.items() for k, v in r["metrics"].items()}, step=state.step
    )
    summary = {
        "paradigm": train_args.paradigm,
        "weighting": {"name": weighting.name, "weights": weighting.weights},
        "steps": state.step,
        "nonfinite_steps": state.nonfinite_steps,
        "train_seconds": time.perf_counter() - started,
        "results": results,
    }
    # The OK / NG threshold, calibrated on validation and stored in the config before it is saved.
    summary["verdict"] = calibrate_and_report_verdict(
        model, sources, eval_settings, data_args, train_args, accelerator
    )
    accelerator.wait_for_everyone()
    card_data = model_card_data(
        model_args,
        data_args,
        train_args,
        configs_by_task,
        results,
        state.step,
        weighting,
        task_scheduler.temperature,
    )
    save_run(accelerator, model, output_dir, summary, card_data, processor, train_args)
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
