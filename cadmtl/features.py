"""Patch features from a DINOv3 backbone, shared by normal-only anomaly detection and reference-guided
localisation.

`PatchFeatureExtractor` runs any model whose `forward(pixel_values, output_hidden_states=True)` returns
`hidden_states` like transformers' DINOv3 models: index 0 is the input of the first block (the embeddings for a
ViT, the pixels for ConvNeXt) and index i the output of block / stage i. Layer indices therefore follow
transformers' `out_indices` convention ("stage{i}") and run from 1 to the backbone depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig


def backbone_depth(config: PreTrainedConfig) -> int:
    """Number of selectable layers: transformer blocks of a ViT, stages of a ConvNeXt."""
    if not is_vit_config(config) and hasattr(config, "hidden_sizes"):
        return len(config.hidden_sizes)
    return int(config.num_hidden_layers)


def is_vit_config(config: PreTrainedConfig) -> bool:
    return hasattr(config, "patch_size") and hasattr(config, "num_register_tokens")


def check_layers(layers: Sequence[int], config: PreTrainedConfig) -> list[int]:
    """The layers as a list, or a ValueError naming them and the backbone depth."""
    layers = [int(layer) for layer in layers]
    depth = backbone_depth(config)
    if not layers or any(not 1 <= layer <= depth for layer in layers):
        raise ValueError(
            f"checkpoint feature layers {layers} do not match a backbone of {depth} layers "
            f"(valid layer indices: 1..{depth})"
        )
    return layers


def backbone_from_cadmtl(model: nn.Module) -> nn.Module:
    """The DINOv3 backbone of a `CadMtlModel` (an `AutoBackbone`, which returns `hidden_states` as well)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise ValueError(f"{type(model).__name__} has no `backbone` attribute")
    return backbone


def backbone_from_config(config: PreTrainedConfig | dict) -> nn.Module:
    """A randomly initialised base model (`DINOv3ViTModel` / `DINOv3ConvNextModel`) from a config or its dict."""
    if isinstance(config, dict):
        config = dict(config)
        config = AutoConfig.for_model(config.pop("model_type"), **config)
    return AutoModel.from_config(config)


def backbone_from_preset(name: str, **overrides) -> nn.Module:
    """A random backbone shaped like a DINOv3 checkpoint ("vits16", "vitb16", "convnext-tiny", "tiny", ...)."""
    from cadmtl.presets import backbone_preset

    return backbone_from_config(backbone_preset(name, **overrides))


class PatchFeatureExtractor(nn.Module):
    """Patch features (B, C, h, w) of `pixel_values` (B, 3, H, W) from the chosen backbone layers.

    ViT: patch tokens of each layer (CLS and `config.num_register_tokens` register tokens dropped), reshaped to
    the (H // patch, W // patch) grid; with `layer_norm=True` the backbone's final LayerNorm is applied to every
    chosen layer, as DINOv2/v3's `get_intermediate_layers(norm=True)`. ConvNeXt: stage outputs, resized
    (bilinear) to the first chosen layer's grid. Layers are concatenated along channels. With `aggregate=True`
    each feature is averaged over its 3x3 neighbourhood (stride 1, padding 1, as PatchCore) for local context.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layers: Sequence[int],
        aggregate: bool = True,
        layer_norm: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.layers = check_layers(layers, self.config)
        self.aggregate = aggregate
        self.layer_norm = layer_norm
        self.is_vit = is_vit_config(self.config)

    @property
    def stride(self) -> int:
        """Input pixels per feature cell along each side."""
        if self.is_vit:
            return int(self.config.patch_size)
        return 4 * 2 ** (self.layers[0] - 1)  # ConvNeXt: stem /4, then /2 per stage

    @property
    def num_channels(self) -> int:
        if self.is_vit:
            return self.config.hidden_size * len(self.layers)
        return sum(self.config.hidden_sizes[layer - 1] for layer in self.layers)

    def _vit_maps(self, hidden_states: Sequence[torch.Tensor], height: int, width: int) -> list[torch.Tensor]:
        grid_h, grid_w = height // self.config.patch_size, width // self.config.patch_size
        num_prefix = 1 + self.config.num_register_tokens
        norm = getattr(self.backbone, "norm", None) if self.layer_norm else None
        maps = []
        for layer in self.layers:
            tokens = hidden_states[layer]
            if norm is not None:
                tokens = norm(tokens)
            tokens = tokens[:, num_prefix:, :]  # (B, h*w, C)
            maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid_h, grid_w))
        return maps

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values`: (B, 3, H, W), already normalised -> (B, C, h, w)."""
        outputs = self.backbone(pixel_values, output_hidden_states=True)
        hidden_states = outputs.hidden_states
        if len(hidden_states) != backbone_depth(self.config) + 1:
            raise ValueError(
                f"expected {backbone_depth(self.config) + 1} hidden states from the backbone, got {len(hidden_states)}"
            )
        if self.is_vit:
            maps = self._vit_maps(hidden_states, pixel_values.shape[-2], pixel_values.shape[-1])
        else:
            maps = [hidden_states[layer] for layer in self.layers]
            size = maps[0].shape[-2:]
            maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear") for m in maps]
        if self.aggregate:
            # count_include_pad=False: border cells average their real neighbours instead of zeros.
            maps = [F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=False) for m in maps]
        return torch.cat(maps, dim=1)


def load_backbone(model: str, seed: int = 0) -> tuple[nn.Module, str]:
    """(backbone, description) from a preset name (random init, seeded), a CadMtl model folder (its backbone) or a
    DINOv3 checkpoint (folder or Hub id); the one loader of the patch-feature methods."""
    import json
    from pathlib import Path

    from cadmtl.presets import PRESETS

    if model in PRESETS:
        torch.manual_seed(seed)
        return backbone_from_preset(model), f"preset {model} (random init, seed {seed})"
    path = Path(model)
    config_file = path / "config.json"
    if (
        path.is_dir()
        and config_file.is_file()
        and json.loads(config_file.read_text()).get("model_type") == "cadmtl"
    ):
        from modeling_cadmtl import CadMtlModel

        return backbone_from_cadmtl(CadMtlModel.from_pretrained(path)), f"CadMtl model {path}"
    from transformers import AutoModel

    if not path.exists() and "/" not in model:
        raise ValueError(
            f"{model!r} is neither a backbone preset ({', '.join(PRESETS)}), a model folder nor a Hub id (ORG/NAME)"
        )
    try:
        return AutoModel.from_pretrained(model), f"checkpoint {model}"
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{model!r} is neither a backbone preset ({', '.join(PRESETS)}), a CadMtl model folder nor a "
            f"loadable DINOv3 checkpoint: {error}"
        ) from error
