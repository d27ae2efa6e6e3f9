"""Multi-task training of CadMtl with CoBa and a synchronised task scheduler, on one CPU, one GPU or many.

    accelerate launch train_accelerate.py                         # the built-in CPU demo (tiny DINOv3, cad100k-mini)
    accelerate launch train_accelerate.py --config configs/cad100k_vitb16_adaptive.yaml
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml train_accelerate.py --config ... --paradigm base

Paradigms (as in the CAD 100K paper): `single` trains one task; `base` visits the tasks round robin with equal
weights; `adaptive` samples a task per step with P(task) = softmax(w / T), where w are CoBa's
convergence-balanced weights, updated from held-out losses every `coba_every` steps. `--all_tasks_per_step`
instead runs every task each step and sums the losses weighted by K * w.

Each optimizer step: draw the task (identical on every rank: a pure function of seed and step), take that task's
next batch, forward only its head, backward, drop the gradients of frozen early layers and unused heads, clip,
step. Checkpoints (`accelerator.save_state`) carry CoBa, the scheduler, the data positions and the RNG states, so
`--resume_from_checkpoint latest` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from modeling_cadmtl import CadMtlConfig, CadMtlImageProcessor, CadMtlModel
from modeling_cadmtl.training.arguments import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    parse_arguments,
)
from modeling_cadmtl.training.coba import CoBa
from modeling_cadmtl.training.optim import (
    build_param_groups,
    drop_gradients,
    early_backbone_parameters,
    resolve_freeze_blocks,
    unused_parameters,
    zero_touch,
)
from modeling_cadmtl.training.presets import PRESETS, backbone_preset
from modeling_cadmtl.training.reporting import domain_tables
from modeling_cadmtl.training.scheduler import TaskScheduler
from modeling_cadmtl.training.task_data import (
    LoaderSettings,
    TaskSource,
    TrainStreams,
    attach_label_maps,
    discover_sources,
    evaluate_sources,
    held_out_batches,
    merged_labels,
    move_to,
)
from modeling_cadmtl.training.tracking import JsonlTracker, plot_training_curves

logger = logging.getLogger("train_accelerate")
DEMO_DATASET = "data/cad100k-mini"


class LoopState:
    """Counters of the training loop that a resumed run must continue from (checkpointed with Accelerate)."""

    def __init__(self) -> None:
        self.step = 0
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        vars(self).update(state)


def ensure_dataset(data_args: DataArguments, accelerator: Accelerator) -> None:
    """Generate the demo dataset when the default path is missing (main process builds, the others wait)."""
    if data_args.dataset == DEMO_DATASET and not Path(DEMO_DATASET, "README.md").exists():
        if accelerator.is_main_process:
            from dataset_scripts.make_demo import build_demo

            logger.info("building the demo dataset in %s", DEMO_DATASET)
            build_demo(DEMO_DATASET)
        accelerator.wait_for_everyone()


def build_model(model_args: ModelArguments, label_sets: dict[str, list[str]]) -> CadMtlModel:
    """A CadMtl checkpoint, or a DINOv3 checkpoint / random preset backbone with new heads."""
    if model_args.model_name_or_path:
        return CadMtlModel.from_pretrained(
            model_args.model_name_or_path, attn_implementation=model_args.attn_implementation
        )
    labels = {
        "cls_labels": label_sets.get("cls", ["normal", "anomaly"]),
        "det_labels": label_sets.get("det", ["defect"]),
        "seg_labels": label_sets.get("seg", ["background", "defect"]),
    }
    heads = {
        "neck_channels": model_args.neck_channels,
        "seg_channels": model_args.seg_channels,
        "det_num_convs": model_args.det_num_convs,
    }
    overrides: dict[str, Any] = {"drop_path_rate": model_args.drop_path_rate}
    if model_args.backbone_out_indices:
        overrides["out_indices"] = model_args.backbone_out_indices
    if model_args.backbone in PRESETS:
        backbone_config = backbone_preset(model_args.backbone, **overrides)
        config = CadMtlConfig(backbone_config=backbone_config, **labels, **heads)
        if model_args.attn_implementation:
            config._attn_implementation = model_args.attn_implementation
        return CadMtlModel(config)
    return CadMtlModel.from_backbone(model_args.backbone, backbone_overrides=overrides, **labels, **heads)


def check_same_model(checkpoint: Path, model: CadMtlModel) -> None:
    """Refuse a checkpoint of a different model before Accelerate fails on tensor shapes."""
    saved_path = checkpoint / "cadmtl_config.json"
    if not saved_path.exists():
        raise ValueError(f"{checkpoint} is not a train_accelerate.py checkpoint (no cadmtl_config.json).")
    saved = json.loads(saved_path.read_text())
    current = model.config.to_dict()
    for key in ("cls_labels", "det_labels", "seg_labels", "neck_channels", "seg_channels", "det_num_convs"):
        if saved.get(key) != current.get(key):
            raise ValueError(
                f"Checkpoint {checkpoint} belongs to a different model: {key} is {saved.get(key)} there and "
                f"{current.get(key)} here."
            )
    for key in ("model_type", "hidden_size", "num_hidden_layers", "hidden_sizes", "depths", "out_indices"):
        if saved["backbone_config"].get(key) != current["backbone_config"].get(key):
            raise ValueError(
                f"Checkpoint {checkpoint} belongs to a different backbone: {key} is "
                f"{saved['backbone_config'].get(key)} there and {current['backbone_config'].get(key)} here."
            )


def find_checkpoint(train_args: TrainingArguments) -> Path | None:
    if not train_args.resume_from_checkpoint:
        return None
    if train_args.resume_from_checkpoint != "latest":
        path = Path(train_args.resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"Checkpoint folder {path} does not exist.")
        return path
    checkpoints = sorted(
        Path(train_args.output_dir, "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:])
    )
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    accelerator: Accelerator, model: CadMtlModel, train_args: TrainingArguments, step: int
) -> None:
    """Write to a temporary folder, then rename: a run killed mid-save leaves no half-written checkpoint."""
    root = Path(train_args.output_dir, "checkpoints")
    final, partial = root / f"step_{step}", root / f".partial_step_{step}"
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        (partial / "cadmtl_config.json").write_text(model.config.to_json_string())
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        kept = sorted(root.glob("step_*"), key=lambda p: int(p.name[5:]))
        for old in kept[: max(0, len(kept) - train_args.save_total_limit)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def make_trackers(train_args: TrainingArguments) -> list[Any]:
    trackers: list[Any] = []
    for name in train_args.report_to:
        if name == "jsonl":
            trackers.append(JsonlTracker("cadmtl", Path(train_args.output_dir, "logs")))
        elif name != "none":
            trackers.append(name)  # an Accelerate tracker name: tensorboard, wandb, trackio...
    return trackers


def class_candidates(
    sources: dict[str, list[TaskSource]], num_classes: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """For each classification config, a (K_cls,) mask of its own classes: its images are trained and scored
    among their domain's classes (`cls_candidates` of the model's forward)."""
    masks = {}
    for source in sources.get("cls", []):
        mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
        mask[source.model_label_ids] = True
        masks[source.config] = mask
    return masks


def task_forward(
    model: torch.nn.Module,
    task: str,
    source: TaskSource,
    batch: dict[str, Any],
    device: torch.device,
    candidates: dict[str, torch.Tensor],
) -> Any:
    """The model on one task's batch (with its config's class candidates for classification, if any)."""
    pixel_values, labels = move_to(batch, device)
    extra = (
        {"cls_candidates": candidates[source.config]} if task == "cls" and source.config in candidates else {}
    )
    return model(pixel_values, task=task, labels=labels, **extra)


@torch.no_grad()
def held_out_losses(
    model: torch.nn.Module,
    held_out: dict[str, list[tuple[TaskSource, dict[str, Any]]]],
    accelerator: Accelerator,
    candidates: dict[str, torch.Tensor],
) -> dict[str, float]:
    """Each task's mean loss on its fixed held-out batches, averaged over ranks (CoBa's validation losses)."""
    model.eval()
    totals = []
    for task, task_batches in held_out.items():
        total = torch.zeros(2, device=accelerator.device)
        for source, batch in task_batches:
            with accelerator.autocast():
                outputs = task_forward(model, task, source, batch, accelerator.device, candidates)
            total[0] += outputs.loss.float()
            total[1] += 1
        totals.append(total)
    model.train()
    reduced = accelerator.reduce(torch.stack(totals), reduction="sum")
    return {task: (reduced[i, 0] / reduced[i, 1]).item() for i, task in enumerate(held_out)}


def evaluate_all(
    model: torch.nn.Module,
    sources: dict[str, list[Any]],
    settings: LoaderSettings,
    labels: dict[str, list[str]],
    data_args: DataArguments,
    train_args: TrainingArguments,
    accelerator: Accelerator,
) -> dict[str, dict[str, Any]]:
    """Metrics of every config of every trained task on `settings.split`."""
    return evaluate_sources(
        model,
        sources,
        settings,
        labels,
        batch_size=data_args.eval_batch_size,
        device=accelerator.device,
        autocast_dtype=torch.bfloat16 if accelerator.mixed_precision == "bf16" else None,
        max_batches=train_args.max_eval_batches,
        show_progress=accelerator.is_local_main_process,
        domain_conditioning=train_args.cls_domain_conditioning,
    )


def results_tables(results: dict[str, dict[str, Any]], name: str) -> str:
    """The paper-shaped tables (`reporting.domain_tables`) of each evaluated split."""
    splits = dict.fromkeys(result["split"] for result in results.values())
    return "\n".join(domain_tables({name: results}, split=split) for split in splits)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, train_args = parse_arguments(argv)
    output_dir = Path(train_args.output_dir)
    ddp_kwargs = DistributedDataParallelKwargs(
        find_unused_parameters=train_args.ddp_unused == "find_unused" and not train_args.all_tasks_per_step,
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
    loader_settings = LoaderSettings(
        dataset=data_args.dataset,
        split=data_args.train_split,
        image_sizes=image_sizes,
        batch_size=data_args.batch_size,
        num_workers=data_args.num_workers,
        shuffle_buffer=data_args.shuffle_buffer,
        seed=train_args.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )
    eval_settings = LoaderSettings(**{**asdict(loader_settings), "split": data_args.eval_split})
    streams = TrainStreams(sources, loader_settings)
    candidates = (
        class_candidates(sources, len(model.config.cls_labels), accelerator.device)
        if train_args.cls_domain_conditioning
        else {}
    )

    # ------------------------------------------------------------------------------- optimisation state
    freeze_blocks = resolve_freeze_blocks(model, train_args.freeze_backbone_layers)
    frozen = early_backbone_parameters(model, freeze_blocks)
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
    coba = CoBa(
        tasks,
        history_length=train_args.coba_history_length,
        warmup_steps=train_args.coba_warmup_steps,
        tau=train_args.coba_tau,
        clamp_divergence=train_args.coba_clamp_divergence,
    )
    mode = {"single": "single", "base": "round_robin", "adaptive": "adaptive"}[train_args.paradigm]
    task_scheduler = TaskScheduler(
        tasks, temperature=train_args.temperature or 1.0 / len(tasks), seed=train_args.seed, mode=mode
    )
    state = LoopState()
    # The LR scheduler is not prepared: Accelerate would step it once per process, but max_steps counts the
    # optimizer steps of each process.
    model, optimizer = accelerator.prepare(model, optimizer)
    for stateful in (lr_scheduler, coba, task_scheduler, state, streams):
        accelerator.register_for_checkpointing(stateful)
    unwrapped: CadMtlModel = accelerator.unwrap_model(model)

    checkpoint = find_checkpoint(train_args)
    if checkpoint is not None:
        check_same_model(checkpoint, unwrapped)
        accelerator.load_state(str(checkpoint))
        logger.info("resumed from %s at step %d", checkpoint, state.step)
    held_out = (
        {
            task: held_out_batches(
                sources[task],
                eval_settings,
                train_args.coba_val_batches,
                train_args.coba_val_batch_size,
            )
            for task in tasks
        }
        if train_args.paradigm == "adaptive"
        else {}
    )

    run_config = {"model": asdict(model_args), "data": asdict(data_args), "training": asdict(train_args)}
    accelerator.init_trackers("cadmtl", config=run_config)
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    # Each rank records its task sequence: every rank must draw the same task at the same step.
    task_log = open(output_dir / "logs" / f"tasks_rank{accelerator.process_index}.txt", "a")  # noqa: SIM115
    if accelerator.is_main_process:
        logger.info(
            "training %s on %s: tasks %s, %d processes, %s, %d steps",
            train_args.paradigm,
            data_args.dataset,
            {t: [s.config for s in sources[t]] for t in tasks},
            accelerator.num_processes,
            accelerator.mixed_precision,
            train_args.max_steps,
        )

    # ---------------------------------------------------------------------------------------------- loop
    progress = tqdm(
        total=train_args.max_steps,
        initial=state.step,
        desc="training",
        disable=not accelerator.is_local_main_process,
    )
    started = time.perf_counter()
    window_losses: dict[str, list[torch.Tensor]] = {}
    # Throughput of the logging window: all images trained on (every rank) and the time spent in CoBa updates.
    window = {"start": started, "images": 0, "coba_seconds": 0.0}
    while state.step < train_args.max_steps:
        step = state.step
        if train_args.paradigm == "adaptive" and step % train_args.coba_every == 0 and held_out:
            coba_started = time.perf_counter()
            losses = held_out_losses(model, held_out, accelerator, candidates)
            task_scheduler.set_weights(coba.update(losses))
            window["coba_seconds"] += time.perf_counter() - coba_started
        step_tasks = tasks if train_args.all_tasks_per_step else [task_scheduler.sample(step)]
        weights = (
            coba.weights if train_args.paradigm == "adaptive" else dict.fromkeys(tasks, 1.0 / len(tasks))
        )
        nonfinite = torch.zeros((), device=accelerator.device)
        for _ in range(train_args.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                loss = torch.zeros((), device=accelerator.device)
                for task in step_tasks:
                    source, batch = streams.next_batch(task)
                    window["images"] += len(batch["pixel_values"]) * accelerator.num_processes
                    task_loss = task_forward(model, task, source, batch, accelerator.device, candidates).loss
                    window_losses.setdefault(task, []).append(task_loss.detach().float())
                    if train_args.all_tasks_per_step or train_args.reweight_sampled_loss:
                        task_loss = task_loss * len(tasks) * weights[task]
                    loss = loss + task_loss
                if train_args.ddp_unused == "zero_touch":
                    loss = loss + zero_touch(unwrapped, set(step_tasks))
                nonfinite += (~torch.isfinite(loss)).float()
                accelerator.backward(loss)
        # Every rank skips together when any rank saw a NaN / inf, so the replicas stay identical.
        stepped = False
        if accelerator.reduce(nonfinite, reduction="sum").item() == 0:
            drop_gradients(unused_parameters(unwrapped, set(step_tasks)))
            if step < train_args.freeze_steps:
                drop_gradients(frozen)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), train_args.max_grad_norm)
            if torch.isfinite(grad_norm):  # the norm of all-reduced gradients: the same on every rank
                optimizer.step()
                lr_scheduler.step()
                stepped = True
        if stepped:
            state.consecutive_nonfinite = 0
        else:
            state.nonfinite_steps += 1
            state.consecutive_nonfinite += 1
            logger.warning(
                "step %d: non-finite loss or gradient (%s), step skipped (%d in a row)",
                step,
                step_tasks,
                state.consecutive_nonfinite,
            )
            if state.consecutive_nonfinite >= train_args.max_consecutive_nonfinite:
                raise RuntimeError(
                    f"Stopping: {state.consecutive_nonfinite} optimizer steps in a row had a NaN or infinite loss or "
                    f"gradient (last at step {step}, tasks {step_tasks}). Lower the learning rate, check the data, "
                    f"or resume from the last checkpoint in {output_dir / 'checkpoints'}."
                )
        optimizer.zero_grad(set_to_none=True)
        task_log.write(f"{step} {','.join(step_tasks)}\n")
        state.step += 1
        progress.update(1)

        if state.step % train_args.logging_steps == 0 or state.step == train_args.max_steps:
            # Mean training loss of each task over the steps since the last log (this rank's batches).
            record = {
                f"loss/{task}": torch.stack(values).mean().item() for task, values in window_losses.items()
            }
            window_losses.clear()
            record["lr"] = lr_scheduler.get_last_lr()[-1]
            record["nonfinite_steps"] = state.nonfinite_steps
            elapsed = time.perf_counter() - window["start"]
            record["throughput/images_per_second"] = window["images"] / elapsed
            record["throughput/coba_fraction"] = window["coba_seconds"] / elapsed
            window.update(start=time.perf_counter(), images=0, coba_seconds=0.0)
            if train_args.paradigm == "adaptive":
                record.update({f"coba/weight/{t}": w for t, w in coba.weights.items()})
                if coba.last_scores is not None:
                    record.update(coba.last_scores.to_log_dict(prefix="coba/"))
            record.update({f"scheduler/prob/{t}": p for t, p in task_scheduler.probabilities.items()})
            accelerator.log(record, step=state.step)
            progress.set_postfix(
                {k.split("/")[-1]: f"{v:.3f}" for k, v in record.items() if k.startswith("loss/")}
            )
        if train_args.save_every and state.step % train_args.save_every == 0:
            save_checkpoint(accelerator, unwrapped, train_args, state.step)
        if (
            train_args.eval_every
            and state.step % train_args.eval_every == 0
            and state.step < train_args.max_steps
        ):
            results = evaluate_all(
                model,
                sources,
                eval_settings,
                labels,
                data_args,
                train_args,
                accelerator,
            )
            accelerator.log(
                {f"eval/{c}/{k}": v for c, r in results.items() for k, v in r["metrics"].items()},
                step=state.step,
            )
    progress.close()
    task_log.close()

    # --------------------------------------------------------------------------------- evaluate and save
    results = evaluate_all(model, sources, eval_settings, labels, data_args, train_args, accelerator)
    if data_args.test_split:
        test_settings = LoaderSettings(**{**asdict(loader_settings), "split": data_args.test_split})
        results.update(
            {
                f"{config}@{data_args.test_split}": result
                for config, result in evaluate_all(
                    model,
                    sources,
                    test_settings,
                    labels,
                    data_args,
                    train_args,
                    accelerator,
                ).items()
            }
        )
    accelerator.log(
        {f"final/{c}/{k}": v for c, r in results.items() for k, v in r["metrics"].items()}, step=state.step
    )
    summary = {
        "paradigm": train_args.paradigm,
        "steps": state.step,
        "nonfinite_steps": state.nonfinite_steps,
        "train_seconds": time.perf_counter() - started,
        "results": results,
        "coba": {"weights": coba.weights} if train_args.paradigm == "adaptive" else None,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model_dir = output_dir / "model"
        card_results = {
            config.split("@")[0]: {"task": r["task"], "split": r["split"], "metrics": r["metrics"]}
            for config, r in results.items()
            if r["split"] == (data_args.test_split or data_args.eval_split)
        }
        card_data = {
            "results": card_results,
            "datasets": [data_args.dataset]
            if "/" in data_args.dataset and not Path(data_args.dataset).exists()
            else [],
            "base_model": model_args.backbone if model_args.backbone not in PRESETS else None,
            "training": {
                "paradigm": train_args.paradigm,
                "steps": state.step,
                "coba": {
                    "every": train_args.coba_every,
                    "history_length": train_args.coba_history_length,
                    "warmup_steps": train_args.coba_warmup_steps,
                    "tau": train_args.coba_tau,
                    "clamp_divergence": train_args.coba_clamp_divergence,
                },
                "scheduler_temperature": task_scheduler.temperature,
                "learning_rate": train_args.learning_rate,
                "mixed_precision": train_args.mixed_precision,
            },
            "training_data": f"{data_args.dataset}: "
            + ", ".join(c for t in tasks for c in configs_by_task[t]),
        }
        processor = CadMtlImageProcessor(size={"height": image_sizes["det"], "width": image_sizes["det"]})
        unwrapped.save_pretrained(
            model_dir,
            state_dict=accelerator.get_state_dict(model),
            image_processor=processor,
            model_card_data=card_data,
        )
        (output_dir / "eval_results.json").write_text(json.dumps(summary, indent=2, default=str))
        (output_dir / "eval_results.md").write_text(results_tables(results, output_dir.name))
        metrics_path = output_dir / "logs" / "metrics.jsonl"
        if metrics_path.exists():
            plot_training_curves(metrics_path, output_dir / "training_curves.png")
        logger.info("saved the model to %s\n%s", model_dir, results_tables(results, output_dir.name))
        if train_args.push_to_hub:
            unwrapped.push_to_hub(
                train_args.hub_model_id or output_dir.name,
                image_processor=processor,
                model_card_data=card_data,
            )
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
