"""Reference-guided localisation with a vision-language model, as DifferAD-R1 does it: GRPO with TRL.

The path: a pairs dataset (config ``pairs``: ``pair_id``, ``reference`` and ``query`` images, ``box`` xyxy
pixels in the query, ``[0, 0, 0, 0]`` when normal) -> :func:`to_conversation` (TRL's conversational
multi-image format, reference first) -> :func:`train_grpo` (TRL's ``GRPOTrainer``, rewards
:func:`~cadmtl.reference.rewards.format_reward` + :func:`~cadmtl.reference.rewards.dclr_reward`) -> a saved
model or LoRA adapter + processor -> :func:`predict_pairs` (the same prompt and parser, zero-shot or trained)
-> ``predictions.jsonl`` rows shaped like the training-free localiser's, so one evaluator serves both.

Coordinates (``coordinates=``):

* ``"qwen2.5"`` (default): Qwen2.5-VL grounds in **absolute pixels of its resized input**. The processor
  resizes each image with ``smart_resize`` (both sides multiples of ``patch_size * merge_size`` = 28, pixel
  count within ``[min_pixels, max_pixels]``), so the truth box is scaled from query pixels to that resized
  size (:func:`answer_size`) and answers are scaled back;
* ``"qwen2"``: Qwen2-VL grounds on a 0-1000 grid of the image's width and height (DifferAD-R1 trains
  Qwen2-VL this way).

The answer's box is clipped to the answer space before it is scaled back, so a prediction always lies in
the query image.

:func:`cadmtl.testing.tiny_random_vlm` builds a Qwen2.5-VL of about 115k parameters with a tokenizer made in
memory, so the whole path runs on CPU with no download (tests, smoke runs: ``--model tiny-random``).

The commands ``cadmtl reference grpo`` and ``zero-shot`` live in :mod:`cadmtl.reference.command`;
``python -m cadmtl.reference.grpo`` runs the first (for ``accelerate launch -m``).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .answers import ParseStats, parse_box
from .boxes import is_zero_box
from .prompts import prompt_messages, prompt_text
from .rewards import dclr_reward, difficulty_weights, format_reward, hungarian_reward, iou_reward

COORDINATES = ("qwen2.5", "qwen2")
NORMALISED_SCALE = 1000
SETTINGS_FILE = "grpo_settings.json"
PREDICTIONS_FILE = "predictions.jsonl"
REWARDS: dict[str, Callable[..., list[float]]] = {
    "format": format_reward,
    "dclr": dclr_reward,
    "iou": iou_reward,
    "hungarian": hungarian_reward,
}
# LoRA on the language model only: the vision tower's MLP has gate/up/down projections too, hence the prefix.
LANGUAGE_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# The columns of the pairs dataset that the conversation dataset keeps (TRL hands them to the rewards).
KEPT_COLUMNS = ("pair_id", "has_anomaly", "category")


# ---------------------------------------------------------------------------------------------------------
# Coordinates


def _check_coordinates(coordinates: str) -> None:
    if coordinates not in COORDINATES:
        raise ValueError(f"coordinates must be one of {COORDINATES}, got {coordinates!r}")


def _size_entry(size: Any, *names: str) -> int | None:
    for name in names:
        value = size.get(name) if isinstance(size, Mapping) else getattr(size, name, None)
        if value:
            return int(value)
    return None


def resized_size(processor: Any, image_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image of ``image_size`` (height, width) after the Qwen-VL image processor's
    ``smart_resize`` (what the vision tower sees, and Qwen2.5-VL's grounding space)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image_processor = getattr(processor, "image_processor", processor)
    factor = image_processor.patch_size * image_processor.merge_size
    size = image_processor.size
    min_pixels = _size_entry(size, "shortest_edge", "min_pixels") or getattr(
        image_processor, "min_pixels", None
    )
    max_pixels = _size_entry(size, "longest_edge", "max_pixels") or getattr(
        image_processor, "max_pixels", None
    )
    if not (min_pixels and max_pixels):
        raise ValueError(f"the image processor's size gives no min/max pixels: {size}")
    return smart_resize(int(image_size[0]), int(image_size[1]), factor, int(min_pixels), int(max_pixels))


def answer_size(processor: Any, image_size: tuple[int, int], coordinates: str = "qwen2.5") -> tuple[int, int]:
    """(height, width) of the space the answer's coordinates live in, for a query of ``image_size``."""
    _check_coordinates(coordinates)
    if coordinates == "qwen2":
        return (NORMALISED_SCALE, NORMALISED_SCALE)
    return resized_size(processor, image_size)


def scale_box(
    box: Sequence[float], from_size: tuple[float, float], to_size: tuple[float, float]
) -> tuple[float, float, float, float]:
    """An xyxy box scaled from a (height, width) space to another; the zero box stays the zero box."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if is_zero_box((x1, y1, x2, y2)):
        return (0.0, 0.0, 0.0, 0.0)
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def _image_size(image: Any) -> tuple[int, int]:
    return (image.height, image.width)


# ---------------------------------------------------------------------------------------------------------
# Data


def to_conversation(
    pair: Mapping[str, Any],
    processor: Any,
    coordinates: str = "qwen2.5",
    instruction: int | str | None = None,
    coordinate_hint: bool = False,
) -> dict[str, Any]:
    """One pair as a TRL conversational multi-image sample.

    Returns ``prompt`` (one user message: ``{"type": "image"}`` twice, then the text), ``images``
    ``[reference, query]`` and ``solution`` the truth ``box`` in the answer's coordinates (``[0, 0, 0, 0]`` for
    a normal pair), the column :mod:`~cadmtl.reference.rewards` scores against.
    """
    query_size = _image_size(pair["query"])
    space = answer_size(processor, query_size, coordinates)
    text = prompt_text(pair.get("pair_id"), instruction, coordinates, coordinate_hint)
    return {
        "prompt": prompt_messages(text),
        "images": [pair["reference"], pair["query"]],
        "solution": list(scale_box(pair["box"], query_size, space)),
    }


def conversation_dataset(
    pairs: Any,
    processor: Any,
    coordinates: str = "qwen2.5",
    instruction: int | str | None = None,
    coordinate_hint: bool = False,
) -> Any:
    """A pairs ``datasets.Dataset`` mapped by :func:`to_conversation`; keeps ``pair_id``, ``has_anomaly`` and
    ``category`` (TRL passes every column to the rewards, which ignore them)."""
    _check_coordinates(coordinates)
    drop = [name for name in pairs.column_names if name not in KEPT_COLUMNS]
    return pairs.map(
        lambda pair: to_conversation(pair, processor, coordinates, instruction, coordinate_hint),
        remove_columns=drop,
        desc="prompts",
    )


def pairs_dataset(repo: str | Path, split: str = "train", limit: int | None = None) -> Any:
    """The first ``limit`` pairs of ``split`` (all by default) as an in-memory ``datasets.Dataset`` with the
    columns the conversation and the prediction read: ``pair_id``, ``reference``, ``query``, ``box``,
    ``has_anomaly``, ``category``. Read by :func:`cadmtl.reference.pairs.load_pairs` (its errors name the repo
    and the split)."""
    import datasets

    from .pairs import load_pairs, pair_features

    columns = ("pair_id", "reference", "query", "box", *KEPT_COLUMNS[1:])
    rows: dict[str, list] = {name: [] for name in columns}
    for pair in itertools.islice(load_pairs(repo, split), limit):
        for name in columns:
            rows[name].append(getattr(pair, name))
    features = pair_features()
    return datasets.Dataset.from_dict(
        rows, features=datasets.Features({name: features[name] for name in columns})
    )


def load_vlm(name: str, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """(model, processor) from a Hub id, a saved folder (a full model, or a LoRA adapter whose base is loaded
    first), or ``tiny-random``. ``dtype`` defaults to bfloat16 on a GPU, float32 on CPU."""
    from cadmtl.testing import TINY_RANDOM, tiny_random_vlm

    if name == TINY_RANDOM:
        return tiny_random_vlm()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = Path(name)
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        model, processor = load_vlm(base, dtype)
        model = PeftModel.from_pretrained(model, str(folder))
        if any((folder / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
            processor = AutoProcessor.from_pretrained(str(folder))
        return model.eval(), processor
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype)
    return model.eval(), AutoProcessor.from_pretrained(name)


def set_pixel_range(processor: Any, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Bound the pixels of each image the Qwen-VL processor feeds the model (``smart_resize``'s range; the
    answer coordinates of ``qwen2.5`` follow, since :func:`resized_size` reads the same size)."""
    if min_pixels is None and max_pixels is None:
        return
    image_processor = getattr(processor, "image_processor", processor)
    size = image_processor.size
    low = min_pixels if min_pixels is not None else _size_entry(size, "shortest_edge", "min_pixels")
    high = max_pixels if max_pixels is not None else _size_entry(size, "longest_edge", "max_pixels")
    values = {"shortest_edge": int(low), "longest_edge": int(high)}
    image_processor.size = values if isinstance(size, dict) else type(size)(**values)


def vision_tower(model: Any) -> torch.nn.Module | None:
    """The vision encoder of a Qwen-VL-style model (``model.model.visual`` in transformers 5), or None; a peft
    model is looked into."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    for path in ("model.visual", "visual", "model.vision_tower", "vision_tower"):
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, torch.nn.Module):
            return module
    return None


def freeze_vision_tower(model: Any) -> int:
    """Turn off gradients of the vision tower (DifferAD-R1's ``--freeze_vision_modules``); returns how many
    parameters were frozen."""
    tower = vision_tower(model)
    if tower is None:
        raise ValueError(f"{type(model).__name__} has no vision tower to freeze")
    frozen = 0
    for parameter in tower.parameters():
        parameter.requires_grad_(False)
        frozen += getattr(parameter, "ds_numel", parameter.numel())  # ZeRO-3 partitions hold 0 elements
    return frozen


# ---------------------------------------------------------------------------------------------------------
# GRPO


def completion_weights(
    accuracy: torch.Tensor, num_generations: int, error_threshold: float = 0.3
) -> torch.Tensor:
    """Per-completion difficulty weights: (B * G,) accuracy rewards, grouped by prompt as TRL orders them
    (G consecutive completions per prompt) -> :func:`~cadmtl.reference.rewards.difficulty_weights` of each
    group repeated G times."""
    grouped = torch.nan_to_num(accuracy.float(), nan=0.0).view(-1, num_generations)
    return difficulty_weights(grouped, error_threshold).repeat_interleave(num_generations)


def _difficulty_trainer_class() -> type:
    from trl import GRPOTrainer

    class DifficultyWeightedGRPOTrainer(GRPOTrainer):
        """``GRPOTrainer`` with DifferAD-R1's difficulty-aware group weight.

        TRL has no public hook for a per-group loss weight, so this overrides two private methods of TRL 1.16:
        ``_calculate_rewards`` (to keep the gathered (B * G, R) rewards of the generation batch) and
        ``_generate_and_score_completions`` (to multiply this process's advantages by the weight of their
        group). Scaling the advantage by ``w > 0`` scales the clipped surrogate by ``w`` (the clip is on the
        ratio, not the advantage), i.e. it is the weighted policy loss; a KL term (``beta > 0``) stays
        unweighted. The batch mean of the accuracy is over TRL's whole generation batch (all processes).
        """

        def __init__(
            self, *args: Any, accuracy_reward: str = "dclr_reward", error_threshold: float = 0.3, **kwargs
        ):
            super().__init__(*args, **kwargs)
            if accuracy_reward not in self.reward_func_names:
                raise ValueError(f"no reward named {accuracy_reward!r} among {self.reward_func_names}")
            self.accuracy_index = self.reward_func_names.index(accuracy_reward)
            self.error_threshold = error_threshold
            self._gathered_rewards: torch.Tensor | None = None

        def _calculate_rewards(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            rewards = super()._calculate_rewards(*args, **kwargs)
            self._gathered_rewards = rewards
            return rewards

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            output = super()._generate_and_score_completions(inputs)
            rewards, self._gathered_rewards = self._gathered_rewards, None
            if self.model.training and rewards is not None:
                weights = completion_weights(
                    rewards[:, self.accuracy_index], self.num_generations, self.error_threshold
                )
                index = self.accelerator.process_index
                local = weights[index * len(inputs) : (index + 1) * len(inputs)]
                output["advantages"] = output["advantages"] * local.to(output["advantages"].device)
                self._metrics["train"]["difficulty_weight/mean"].append(weights.mean().item())
            return output

    return DifficultyWeightedGRPOTrainer


def grpo_config(
    output_dir: str | Path,
    max_steps: int = -1,
    *,
    num_generations: int = 4,
    per_device_train_batch_size: int | None = None,
    gradient_accumulation_steps: int = 1,
    learning_rate: float = 1e-6,
    max_completion_length: int = 256,
    temperature: float = 0.9,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float = 0.28,
    loss_type: str = "dapo",
    reward_weights: Sequence[float] | None = None,
    seed: int = 42,
    **overrides: Any,
) -> Any:
    """A ``GRPOConfig`` for the localisation run: DAPO loss and asymmetric clipping 0.2 / 0.28 (DifferAD-R1's),
    bf16 and activation (gradient) checkpointing on a GPU only, no checkpoints mid-run (the end saves), logs
    every step.

    ``per_device_train_batch_size`` defaults to ``num_generations`` (one prompt's group per device step; the
    effective batch must be a multiple of ``num_generations``). ``overrides`` are any other GRPOConfig fields.
    """
    from trl import GRPOConfig

    cuda = torch.cuda.is_available()
    settings = {
        "output_dir": str(output_dir),
        "max_steps": max_steps,
        "num_generations": num_generations,
        "per_device_train_batch_size": per_device_train_batch_size or num_generations,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "learning_rate": learning_rate,
        "max_completion_length": max_completion_length,
        "temperature": temperature,
        "beta": beta,
        "epsilon": epsilon,
        "epsilon_high": epsilon_high,
        "loss_type": loss_type,
        "reward_weights": list(reward_weights) if reward_weights is not None else None,
        "seed": seed,
        "bf16": cuda and torch.cuda.is_bf16_supported(),
        "use_cpu": not cuda,
        "activation_checkpointing": cuda,  # TRL's gradient_checkpointing=True, under its transformers-5 name
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    return GRPOConfig(**settings)


def train_grpo(
    model: str | Any,
    processor: Any,
    dataset: Any,
    output_dir: str | Path,
    max_steps: int = -1,
    *,
    coordinates: str = "qwen2.5",
    rewards: Sequence[str | Callable[..., list[float]]] = ("format", "dclr"),
    reward_weights: Sequence[float] | None = None,
    lora: bool = False,
    lora_rank: int = 64,
    lora_alpha: int = 128,
    lora_dropout: float = 0.05,
    freeze_vision: bool = True,
    difficulty_aware: bool = False,
    error_threshold: float = 0.3,
    instruction: int | str | None = None,
    coordinate_hint: bool = False,
    callbacks: Sequence[Any] | None = None,
    **config: Any,
) -> Any:
    """Train ``model`` with TRL's ``GRPOTrainer`` on a pairs dataset; save to ``output_dir``; return the trainer.

    Args:
        model: a model, or a Hub id / folder that TRL loads after the GRPOConfig exists (DeepSpeed ZeRO-3 then
            partitions it while loading; pass ``model_init_kwargs={"dtype": "bfloat16"}`` for a 7B model).
        dataset: a pairs ``Dataset`` (converted with :func:`conversation_dataset`) or one already holding
            ``prompt`` / ``images`` / ``solution``.
        rewards: names in :data:`REWARDS` (DifferAD-R1: format + DCLR) or reward functions in TRL's
            signature, weighted by ``reward_weights``.
        lora: LoRA on the language model's attention and MLP projections (:data:`LANGUAGE_LORA_TARGETS`); the
            saved output is then the adapter (``adapter_config.json``), else the full model.
        freeze_vision: no gradients into the vision tower (DifferAD-R1 freezes it).
        difficulty_aware: DifferAD-R1's difficulty-aware group weight on the loss, computed from the
            ``dclr`` (or else the last non-format) reward; see :func:`_difficulty_trainer_class` for how.
        config: :func:`grpo_config` arguments (``num_generations``, ``max_completion_length``, ...) and any
            other GRPOConfig field.

    ``output_dir`` receives the model or adapter, the processor and ``grpo_settings.json`` (coordinates and
    prompt options, read back by :func:`zero_shot_main`).
    """
    from trl import GRPOTrainer

    from cadmtl.testing import TINY_RANDOM

    _check_coordinates(coordinates)
    unknown = [name for name in rewards if isinstance(name, str) and name not in REWARDS]
    if unknown:
        raise ValueError(f"unknown rewards {unknown}; choose from {sorted(REWARDS)}")
    reward_funcs = [REWARDS[name] if isinstance(name, str) else name for name in rewards]
    reward_names = [func.__name__ for func in reward_funcs]
    if "prompt" not in dataset.column_names:
        dataset = conversation_dataset(dataset, processor, coordinates, instruction, coordinate_hint)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=LANGUAGE_LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
    args = grpo_config(output_dir, max_steps, reward_weights=reward_weights, **config)
    trainer_kwargs: dict[str, Any] = {}
    trainer_class = GRPOTrainer
    if difficulty_aware:
        trainer_class = _difficulty_trainer_class()
        others = [name for name in reward_names if name != format_reward.__name__]
        accuracy = dclr_reward.__name__ if dclr_reward.__name__ in reward_names else others[-1]
        trainer_kwargs = {"accuracy_reward": accuracy, "error_threshold": error_threshold}
    trainer = trainer_class(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=list(callbacks) if callbacks else None,
        **trainer_kwargs,
    )
    # Frozen once the trainer holds the model (loaded by TRL when ``model`` is a name), before the optimiser.
    frozen = freeze_vision_tower(trainer.model) if freeze_vision else 0
    trainer.train()
    # The adapter under LoRA, else the full model; the processor too. peft's save asks the Hub whether the base
    # has a config.json (to spot a resized vocabulary): pointless for tiny-random, and slow without network.
    offline = (
        getattr(trainer.model, "name_or_path", None) == TINY_RANDOM and "HF_HUB_OFFLINE" not in os.environ
    )
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=f"Could not find a config file in {TINY_RANDOM}")
            trainer.save_model(str(output_dir))
    finally:
        if offline:
            del os.environ["HF_HUB_OFFLINE"]
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(str(output_dir))
        settings = {
            "coordinates": coordinates,
            "instruction": instruction,
            "coordinate_hint": coordinate_hint,
            "rewards": reward_names,
            "reward_weights": list(reward_weights) if reward_weights is not None else None,
            "lora": lora,
            "frozen_vision_parameters": frozen,
            "difficulty_aware": difficulty_aware,
        }
        (Path(output_dir) / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return trainer


# ---------------------------------------------------------------------------------------------------------
# Prediction


def prediction_row(
    pair_id: str,
    text: str,
    query_size: tuple[int, int],
    space: tuple[int, int],
    parse_stats: ParseStats | None = None,
) -> dict[str, Any]:
    """One ``predictions.jsonl`` row from a generated answer.

    ``boxes`` are xyxy pixels in the query (the answer box clipped to the answer ``space`` and scaled back),
    ``scores`` 1.0 per box (a VLM answer carries no confidence), ``has_anomaly`` whether a non-zero box came
    back, ``parse_ok`` whether a box (the zero box included) could be read. An unparseable answer gives no box
    and ``has_anomaly`` False with ``parse_ok`` False: DifferAD-R1's protocol scores it as wrong either way
    (IoU 0), which an evaluator reads from ``parse_ok``.
    """
    box = parse_box(text, image_size=space, stats=parse_stats)
    boxes = [] if box is None or is_zero_box(box) else [list(scale_box(box, space, query_size))]
    return {
        "pair_id": pair_id,
        "boxes": boxes,
        "scores": [1.0] * len(boxes),
        "has_anomaly": bool(boxes),
        "parse_ok": box is not None,
        "text": text,
    }


@torch.no_grad()
def predict_pairs(
    model: Any,
    processor: Any,
    dataset: Any,
    coordinates: str = "qwen2.5",
    *,
    batch_size: int = 4,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    instruction: int | str | None = None,
    coordinate_hint: bool = False,
    parse_stats: ParseStats | None = None,
) -> list[dict[str, Any]]:
    """Answer every pair with the training prompt (greedy by default) and parse it: one
    :func:`prediction_row` per pair, in dataset order."""
    _check_coordinates(coordinates)
    model.eval()
    device = next(model.parameters()).device
    tokenizer = processor.tokenizer
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    rows = []
    try:
        for start in range(0, len(dataset), batch_size):
            pairs = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            samples = [
                to_conversation(p, processor, coordinates, instruction, coordinate_hint) for p in pairs
            ]
            texts = [
                processor.apply_chat_template(s["prompt"], add_generation_prompt=True, tokenize=False)
                for s in samples
            ]
            inputs = processor(
                images=[s["images"] for s in samples], text=texts, padding=True, return_tensors="pt"
            ).to(device)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample)
            answers = processor.batch_decode(
                generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for pair, answer in zip(pairs, answers):
                query_size = _image_size(pair["query"])
                space = answer_size(processor, query_size, coordinates)
                rows.append(prediction_row(pair["pair_id"], answer, query_size, space, parse_stats))
    finally:
        tokenizer.padding_side = padding_side
    return rows


def write_predictions(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """``predictions.jsonl``: one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


if __name__ == "__main__":  # `accelerate launch -m cadmtl.reference.grpo` (configs/grpo/)
    from .command import grpo_main

    sys.exit(grpo_main())
