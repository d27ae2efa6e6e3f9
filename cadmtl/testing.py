"""Tiny random configurations for tests and examples (like ``transformers.testing_utils``): no downloads.

from cadmtl.testing import tiny_cadmtl_config
model = CadMtlModel(tiny_cadmtl_config())  # a 3-layer, 32-wide DINOv3 ViT with all three heads
model, processor = tiny_random_vlm()       # a ~115k-parameter Qwen2.5-VL and its in-memory processor
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import DINOv3ConvNextConfig, DINOv3ViTConfig

from modeling_cadmtl import CadMtlConfig

CLS_LABELS = ["normal", "worn", "cracked"]
DET_LABELS = ["dent", "scratch"]
SEG_LABELS = ["background", "dent", "scratch"]
# The name of the tiny random vision-language model (`--model tiny-random` in `cadmtl reference grpo / zero-shot`).
TINY_RANDOM = "tiny-random"


def tiny_vit_config(**kwargs: Any) -> DINOv3ViTConfig:
    """A 3-layer DINOv3 ViT, hidden size 32, 4 heads (head_dim 8: RoPE needs a multiple of 4), 2 registers."""
    settings = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_register_tokens": 2,
        "patch_size": 16,
        "pos_embed_rescale": None,
        **kwargs,
    }
    settings.setdefault("out_indices", list(range(1, settings["num_hidden_layers"] + 1))[-3:])
    return DINOv3ViTConfig(**settings)


def tiny_convnext_config() -> DINOv3ConvNextConfig:
    """A DINOv3 ConvNeXt with one block per stage and 8 / 16 / 32 / 64 channels."""
    return DINOv3ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])


def tiny_cadmtl_config(backbone: str = "vit", **kwargs: Any) -> CadMtlConfig:
    """A CadMtl config on a tiny ViT (``backbone="vit"``) or ConvNeXt with the test label sets, 16-channel heads."""
    backbone_config = tiny_vit_config() if backbone == "vit" else tiny_convnext_config()
    settings = {
        "cls_labels": CLS_LABELS,
        "det_labels": DET_LABELS,
        "seg_labels": SEG_LABELS,
        "neck_channels": 16,
        "seg_channels": 16,
        **kwargs,
    }
    return CadMtlConfig(backbone_config=backbone_config, **settings)


def detection_target(boxes: list[list[float]], classes: list[int]) -> dict[str, torch.Tensor]:
    """A DETR-style target with normalised (cx, cy, w, h) boxes."""
    return {
        "class_labels": torch.tensor(classes, dtype=torch.long),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
    }


def populate_hf_cache(source: Path, repo_id: str, hf_home: Path) -> None:
    """Lay a saved folder out as the Hugging Face cache would after a download of `repo_id`."""
    folder = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    shutil.copytree(source, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)


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
