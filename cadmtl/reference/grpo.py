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

:func:`tiny_random_vlm` builds a Qwen2.5-VL of about 115k parameters with a tokenizer made in memory, so the
whole path runs on CPU with no download (tests, smoke runs: ``--model tiny-random``).

Commands (functions for ``cadmtl reference ...``): :func:`main` (``grpo``) and :func:`zero_shot_main`
(``zero-shot``); ``python -m cadmtl.reference.grpo`` runs :func:`main` too (for ``accelerate launch -m``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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
TINY_RANDOM = "tiny-random"
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


def load_pairs(path: str, split: str = "train", limit: int | None = None) -> Any:
    """A split of the ``pairs`` config of a dataset repo (Hub id or local folder), not streamed.

    A local folder is read with ``download_mode="force_redownload"``: datasets 5.2 caches a non-streaming
    local load by the folder's name, so a rebuilt repo would otherwise return stale rows.
    """
    import datasets

    kwargs = {"download_mode": "force_redownload"} if Path(path).is_dir() else {}
    pairs = datasets.load_dataset(path, "pairs", split=split, **kwargs)
    if limit is not None:
        pairs = pairs.select(range(min(limit, len(pairs))))
    return pairs


# ---------------------------------------------------------------------------------------------------------
# A tiny random Qwen2.5-VL, built in memory

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen's chat format, without the default system turn; an image part becomes the vision span the processor
# expands to one <|image_pad|> per merged patch.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 byte symbols, no merges) plus Qwen's chat and vision special tokens, as a
    ``PreTrainedTokenizerFast`` with a chat template: any text round-trips, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={symbol: i for i, symbol in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=TINY_CHAT_TEMPLATE,
    )


def tiny_processor(min_pixels: int = 56 * 56, max_pixels: int = 112 * 112) -> Any:
    """A ``Qwen2_5_VLProcessor`` over :func:`tiny_tokenizer`: patch 14, merge 2, images resized to
    ``[min_pixels, max_pixels]`` (4 to 16 vision tokens each with the defaults)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tiny_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(),  # required: None raises TypeError
        chat_template=TINY_CHAT_TEMPLATE,
    )


def tiny_vlm_config(tokenizer: Any) -> Any:
    """A ``Qwen2_5_VLConfig``: 2 text layers (hidden 32, 4 heads, head_dim 8, mrope sections 1+1+2 = 8 / 2), a
    2-block vision tower (hidden 32, patch 14, merge 2), token ids wired to ``tokenizer``'s special tokens."""
    from transformers import Qwen2_5_VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": 32,
        "fullatt_block_indexes": [1],
        "window_size": 56,
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def tiny_random_vlm(seed: int = 0) -> tuple[Any, Any]:
    """(model, processor): a random ``Qwen2_5_VLForConditionalGeneration`` of ~115k parameters and its
    in-memory processor. The weights depend on ``seed`` only, so ``tiny-random`` names the same model in every
    process (a LoRA adapter trained on it records ``tiny-random`` as its base and loads back with
    :func:`load_vlm`)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = tiny_processor()
    config = tiny_vlm_config(processor.tokenizer)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.config._name_or_path = model.name_or_path = TINY_RANDOM  # peft records name_or_path as the base
    tokenizer = processor.tokenizer
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


def load_vlm(name: str, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """(model, processor) from a Hub id, a saved folder (a full model, or a LoRA adapter whose base is loaded
    first), or ``tiny-random``. ``dtype`` defaults to bfloat16 on a GPU, float32 on CPU."""
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


# ---------------------------------------------------------------------------------------------------------
# Commands

GRPO_EXAMPLE = """\
examples:
  # the whole path on CPU in seconds (a tiny random Qwen2.5-VL, no download)
  cadmtl reference grpo --model tiny-random --dataset outputs/pairs --output-dir outputs/grpo-tiny \\
      --max-steps 2 --num-generations 2 --max-completion-length 16
  # DifferAD-R1's recipe on 8 GPUs (DeepSpeed ZeRO-3)
  accelerate launch --config_file configs/grpo/accelerate_zero3.yaml -m cadmtl.reference.grpo \\
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
    parser.add_argument("--output-dir")
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, help="train on the first N pairs only")
    parser.add_argument("--coordinates", choices=COORDINATES, default="qwen2.5")
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: num-train-epochs over the split")
    parser.add_argument("--num-train-epochs", type=float, default=1.0)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument(
        "--batch-size", type=int, help="completions per device step (default: num-generations)"
    )
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
    parser.add_argument("--seed", type=int, default=42)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``cadmtl reference grpo``."""
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
    pairs = load_pairs(args.dataset, args.split, args.limit)
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
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--limit", type=int, help="the first N pairs only")
    parser.add_argument(
        "--coordinates",
        choices=COORDINATES,
        help="default: the model folder's grpo_settings.json, else qwen2 for a Qwen2-VL model, else qwen2.5",
    )
    parser.add_argument("--coordinate-hint", action="store_true", default=None)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--min-pixels", type=int, help="smallest image (pixels) fed to the model")
    parser.add_argument("--max-pixels", type=int, help="largest image (pixels) fed to the model")
    return parser


def _default_coordinates(model: Any) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return "qwen2" if model_type == "qwen2_vl" else "qwen2.5"


def zero_shot_main(argv: Sequence[str] | None = None) -> int:
    """``cadmtl reference zero-shot``."""
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
    pairs = load_pairs(args.dataset, args.split, args.limit)
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


if __name__ == "__main__":
    sys.exit(main())
