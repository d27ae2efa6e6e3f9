"""The vision-language commands of `cadmtl reference`: ``grpo`` (:func:`grpo_main`) and ``zero-shot``
(:func:`zero_shot_main`).

The group's table is in :mod:`cadmtl.cli` (``build-pairs``, ``localize`` and ``evaluate`` are the ``main`` of
their modules). These import :mod:`cadmtl.reference.grpo` (torch, TRL) only when run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dataset_scripts.options import add_batch_size_option, add_output_dir_option, add_seed_option

# ---------------------------------------------------------------------------------------------------------
# The vision-language commands: grpo and zero-shot (library code in cadmtl.reference.grpo)

GRPO_EXAMPLE = """\
examples:
  # the whole path on CPU in seconds (a tiny random Qwen2.5-VL, no download)
  cadmtl reference grpo --model tiny-random --dataset outputs/pairs --output-dir outputs/grpo-tiny \\
      --max-steps 2 --num-generations 2 --max-completion-length 16
  # DifferAD-R1's recipe on 8 GPUs (DeepSpeed ZeRO-3)
  accelerate launch --config-file configs/grpo/accelerate_zero3.yaml -m cadmtl.reference.grpo \\
      --config configs/grpo/differad_r1_qwen2_5_vl_7b.yaml --dataset outputs/pairs --output-dir outputs/grpo
"""

ZERO_SHOT_EXAMPLE = """\
examples:
  cadmtl reference zero-shot --model Qwen/Qwen2.5-VL-7B-Instruct --dataset outputs/pairs --split test \\
      --output-dir outputs/zero-shot
  cadmtl reference zero-shot --model outputs/grpo --dataset outputs/pairs --split test --output-dir outputs/grpo-eval
"""


def _config_defaults(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    """Apply a ``--config`` YAML: its keys become argument defaults, its ``grpo_config`` mapping is returned
    (extra GRPOConfig fields)."""
    import yaml

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return {}
    values = yaml.safe_load(Path(known.config).read_text()) or {}
    extra = dict(values.pop("grpo_config", None) or {})
    dests = {action.dest for action in parser._actions}
    unknown = sorted(k for k in values if k.replace("-", "_") not in dests)
    if unknown:
        parser.error(f"{known.config}: unknown keys {unknown}")
    parser.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})
    return extra


def grpo_parser() -> argparse.ArgumentParser:
    from .grpo import COORDINATES, REWARDS

    parser = argparse.ArgumentParser(
        prog="cadmtl reference grpo",
        description="GRPO training of a vision-language model for reference-guided defect localisation "
        "(DifferAD-R1 with TRL): format + DCLR rewards, DAPO clipping 0.2 / 0.28, frozen vision tower.",
        epilog=GRPO_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="a YAML of these options (+ grpo_config: extra GRPOConfig fields)")
    parser.add_argument("--model", help="Hub id, folder, or tiny-random")
    parser.add_argument("--dataset", help="pairs dataset repo (Hub id or folder) with config 'pairs'")
    add_output_dir_option(parser, "where the model (or LoRA adapter) is saved", required=False)
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, help="train on the first N pairs only")
    parser.add_argument("--coordinates", choices=COORDINATES, default="qwen2.5")
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: num-train-epochs over the split")
    parser.add_argument("--num-train-epochs", type=float, default=1.0)
    parser.add_argument("--num-generations", type=int, default=4)
    add_batch_size_option(parser, None, "completions per device step (default: --num-generations)")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--max-completion-length", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (0: no reference model)")
    parser.add_argument("--epsilon", type=float, default=0.2)
    parser.add_argument("--epsilon-high", type=float, default=0.28)
    parser.add_argument("--loss-type", default="dapo")
    parser.add_argument("--rewards", nargs="+", default=["format", "dclr"], choices=sorted(REWARDS))
    parser.add_argument("--reward-weights", nargs="+", type=float)
    parser.add_argument("--lora", action="store_true", help="LoRA on the language model; saves the adapter")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--lora-alpha", type=int, default=128)
    parser.add_argument("--no-freeze-vision", dest="freeze_vision", action="store_false")
    parser.add_argument("--difficulty-aware", action="store_true", help="DifferAD-R1's group weight")
    parser.add_argument("--coordinate-hint", action="store_true", help="name the coordinate convention")
    parser.add_argument("--min-pixels", type=int, help="smallest image (pixels) fed to the model")
    parser.add_argument("--max-pixels", type=int, help="largest image (pixels) fed to the model")
    add_seed_option(parser, 42)
    return parser


def grpo_main(argv: Sequence[str] | None = None) -> int:
    """``cadmtl reference grpo``."""
    import torch

    from cadmtl.testing import TINY_RANDOM

    from .grpo import load_vlm, pairs_dataset, set_pixel_range, train_grpo

    parser = grpo_parser()
    extra = _config_defaults(parser, argv)
    args = parser.parse_args(argv)
    missing = [name for name in ("model", "dataset", "output_dir") if not getattr(args, name)]
    if missing:
        parser.error("missing " + ", ".join("--" + name.replace("_", "-") for name in missing))
    if args.model == TINY_RANDOM or (Path(args.model) / "adapter_config.json").is_file():
        model, processor = load_vlm(args.model)
    else:  # TRL loads it once the config exists (ZeRO-3 partitions it while loading)
        from transformers import AutoProcessor

        model, processor = args.model, AutoProcessor.from_pretrained(args.model)
        if torch.cuda.is_available():
            extra.setdefault("model_init_kwargs", {"dtype": "bfloat16"})
    set_pixel_range(processor, args.min_pixels, args.max_pixels)
    pairs = pairs_dataset(args.dataset, args.split, args.limit)
    started = time.perf_counter()
    trainer = train_grpo(
        model,
        processor,
        pairs,
        args.output_dir,
        args.max_steps,
        coordinates=args.coordinates,
        rewards=args.rewards,
        reward_weights=args.reward_weights,
        lora=args.lora,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        freeze_vision=args.freeze_vision,
        difficulty_aware=args.difficulty_aware,
        coordinate_hint=args.coordinate_hint,
        num_generations=args.num_generations,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        beta=args.beta,
        epsilon=args.epsilon,
        epsilon_high=args.epsilon_high,
        loss_type=args.loss_type,
        seed=args.seed,
        num_train_epochs=args.num_train_epochs,
        **extra,
    )
    steps = trainer.state.global_step
    seconds = time.perf_counter() - started
    print(f"{steps} GRPO steps in {seconds:.1f} s; saved to {args.output_dir}")
    return 0


def zero_shot_parser() -> argparse.ArgumentParser:
    from .grpo import COORDINATES

    parser = argparse.ArgumentParser(
        prog="cadmtl reference zero-shot",
        description="Answer reference/query pairs with a vision-language model (a Hub model zero-shot, or a "
        "GRPO output) using the GRPO prompt; writes predictions.jsonl (boxes in query pixels) like the "
        "training-free localiser, plus parse_stats.json.",
        epilog=ZERO_SHOT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="Hub id, folder (model or LoRA adapter), or tiny-random"
    )
    parser.add_argument("--dataset", required=True, help="pairs dataset repo (Hub id or folder)")
    parser.add_argument("--split", default="test")
    add_output_dir_option(parser, "folder for predictions.jsonl and parse_stats.json")
    parser.add_argument("--limit", type=int, help="the first N pairs only")
    parser.add_argument(
        "--coordinates",
        choices=COORDINATES,
        help="default: the model folder's grpo_settings.json, else qwen2 for a Qwen2-VL model, else qwen2.5",
    )
    parser.add_argument("--coordinate-hint", action="store_true", default=None)
    add_batch_size_option(parser, 4, "pairs per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--min-pixels", type=int, help="smallest image (pixels) fed to the model")
    parser.add_argument("--max-pixels", type=int, help="largest image (pixels) fed to the model")
    return parser


def _default_coordinates(model: Any) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return "qwen2" if model_type == "qwen2_vl" else "qwen2.5"


def zero_shot_main(argv: Sequence[str] | None = None) -> int:
    """``cadmtl reference zero-shot``."""
    import torch

    from .answers import ParseStats
    from .grpo import (
        PREDICTIONS_FILE,
        SETTINGS_FILE,
        load_vlm,
        pairs_dataset,
        predict_pairs,
        set_pixel_range,
        write_predictions,
    )

    args = zero_shot_parser().parse_args(argv)
    settings_path = Path(args.model) / SETTINGS_FILE
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    model, processor = load_vlm(args.model)
    set_pixel_range(processor, args.min_pixels, args.max_pixels)
    if torch.cuda.is_available():
        model = model.to("cuda")
    coordinates = args.coordinates or settings.get("coordinates") or _default_coordinates(model)
    hint = (
        args.coordinate_hint if args.coordinate_hint is not None else settings.get("coordinate_hint", False)
    )
    pairs = pairs_dataset(args.dataset, args.split, args.limit)
    stats = ParseStats()
    started = time.perf_counter()
    rows = predict_pairs(
        model,
        processor,
        pairs,
        coordinates,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        instruction=settings.get("instruction"),
        coordinate_hint=hint,
        parse_stats=stats,
    )
    seconds = time.perf_counter() - started
    output = Path(args.output_dir)
    write_predictions(rows, output / PREDICTIONS_FILE)
    summary = {"model": args.model, "coordinates": coordinates, "pairs": len(rows), "seconds": seconds}
    summary |= {"parse": stats.as_dict()}
    (output / "parse_stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    rate = stats.failure_rate
    print(
        f"{len(rows)} pairs in {seconds:.1f} s, parse failures {rate:.1%}; wrote {output / PREDICTIONS_FILE}"
    )
    return 0
