"""Optimizer parameter groups (layer-wise learning-rate decay, no decay on norms / biases / tokens) and the
early-layer freezing used during warm-up."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from cadmtl.tasks import CADMTL_TASKS, TASKS, get_cadmtl_task
from modeling_cadmtl import CadMtlModel

_VIT_LAYER = re.compile(r"^model\.layer\.(\d+)\.")
_CONVNEXT_STAGE = re.compile(r"^model\.stages\.(\d+)\.")
_TIMM_STAGE = re.compile(r"^_backbone\.blocks\.(\d+)\.")  # EfficientNet: stem, blocks.<stage>, ...


def backbone_depth(model: CadMtlModel) -> int:
    """Number of backbone blocks that get their own learning rate: ViT layers, ConvNeXt or timm stages."""
    config = model.config.backbone_config
    if model.config.is_timm:
        return len(model.backbone._backbone.blocks)
    return config.num_hidden_layers if model.config.is_vit else len(config.depths)


def backbone_layer_id(name: str, model: CadMtlModel) -> int:
    """0 for the embeddings, i + 1 for ViT layer / ConvNeXt stage i, depth + 1 for the final norm."""
    pattern = _VIT_LAYER if model.config.is_vit else _TIMM_STAGE if model.config.is_timm else _CONVNEXT_STAGE
    match = pattern.match(name)
    if match:
        return int(match.group(1)) + 1
    if name.startswith(("embeddings.", "_backbone.conv_stem.", "_backbone.bn1.")):
        return 0
    return backbone_depth(model) + 1


def _no_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    # Norm weights, biases, learnable tokens, layer scales and per-level scales only shift or scale activations.
    return parameter.ndim <= 1 or name.endswith(("cls_token", "register_tokens", "mask_token"))


def build_param_groups(
    model: CadMtlModel,
    learning_rate: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    head_lr_multiplier: float = 1.0,
) -> list[dict]:
    """AdamW parameter groups.

    Backbone block `i` of `depth` trains at `learning_rate * layer_decay ** (depth + 1 - i)` (layer-wise decay as
    in BEiT / DINOv3 fine-tuning: early, generic layers move less); the neck and heads at
    `learning_rate * head_lr_multiplier`. Each group records `lr_scale` so schedulers can rescale it.
    """
    depth = backbone_depth(model)
    groups: dict[tuple[str, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("backbone."):
            layer_id = backbone_layer_id(name.removeprefix("backbone."), model)
            key, scale = f"backbone.{layer_id}", layer_decay ** (depth + 1 - layer_id)
        else:
            key, scale = "heads", head_lr_multiplier
        no_decay = _no_weight_decay(name, parameter)
        group = groups.setdefault(
            (key, no_decay),
            {
                "params": [],
                "names": [],
                "lr": learning_rate * scale,
                "lr_scale": scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
            },
        )
        group["params"].append(parameter)
        group["names"].append(name)
    return list(groups.values())


def early_backbone_parameters(model: CadMtlModel, num_blocks: int) -> list[nn.Parameter]:
    """The embeddings and the first `num_blocks` backbone blocks (ViT layers or ConvNeXt stages)."""
    if num_blocks <= 0:
        return []
    return [
        p for name, p in model.backbone.named_parameters() if backbone_layer_id(name, model) <= num_blocks
    ]


def resolve_freeze_blocks(model: CadMtlModel, freeze: float) -> int:
    """`freeze` >= 1 is a number of blocks; 0 < freeze < 1 a fraction of the depth; 0 freezes nothing."""
    if freeze < 0:
        raise ValueError(f"freeze_backbone_layers must be >= 0, got {freeze}.")
    depth = backbone_depth(model)
    blocks = round(freeze * depth) if freeze < 1 else int(freeze)
    if blocks > depth:
        raise ValueError(f"Cannot freeze {blocks} blocks of a backbone with {depth}.")
    return blocks


def freeze_for_whole_run(parameters: list[nn.Parameter]) -> None:
    """Early layers frozen for the whole run get no gradient at all, so autograd skips their backward pass (the
    warm-up freezing drops gradients after the fact, which keeps DDP's buckets but saves no compute)."""
    for parameter in parameters:
        parameter.requires_grad_(False)


def _keep_eval_mode(module: nn.Module, _inputs: Any) -> None:
    module.eval()


def freeze_batch_norm_statistics(backbone: nn.Module) -> int:
    """Backbone BatchNorm layers normalise with their pretrained running statistics in training too (as
    torchvision's detection models do with `FrozenBatchNorm2d`): fine-tuning batches of 8 images give noisy batch
    statistics, and cls / det / seg batches of different sizes would drag them apart. Their affine weights still
    train. Returns how many layers were frozen."""
    layers = [module for module in backbone.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.register_forward_pre_hook(_keep_eval_mode)  # `model.train()` runs every step; the hook wins
    return len(layers)


def drop_gradients(parameters: list[nn.Parameter]) -> None:
    """Set `.grad = None` so the optimizer skips these parameters entirely this step.

    Used for frozen early layers during warm-up and for the heads of tasks that did not run: under DDP their
    gradients arrive as all-reduced zeros, and AdamW would otherwise still apply weight decay and momentum to them
    (pytorch/pytorch#41101). Freezing this way, rather than with `requires_grad`, keeps DDP's buckets unchanged.
    """
    for parameter in parameters:
        parameter.grad = None


def head_parameters(model: CadMtlModel) -> dict[str, list[nn.Parameter]]:
    """The parameters that only one task uses (its `TaskDefinition.head_module`), and under "neck" the feature
    pyramid the heads with `uses_neck` share."""
    heads = {
        name: list(getattr(model, task.hub.head_module).parameters()) for name, task in CADMTL_TASKS.items()
    }
    return heads | {"neck": list(model.neck.parameters())}


def unused_parameters(model: CadMtlModel, tasks_run: set[str]) -> list[nn.Parameter]:
    """Parameters no task of this step touched (including the ViT's mask token, which only masked-image
    pre-training uses)."""
    heads = head_parameters(model)
    unused = [p for task in TASKS if task not in tasks_run for p in heads[task]]
    if not any(get_cadmtl_task(task).hub.uses_neck for task in tasks_run):
        unused += heads["neck"]
    mask_token = getattr(getattr(model.backbone, "embeddings", None), "mask_token", None)
    if mask_token is not None:
        unused.append(mask_token)
    return unused


def zero_touch(model: CadMtlModel, tasks_run: set[str]) -> torch.Tensor:
    """0 * (sum of every parameter no task of this step used): a loss term that makes DDP see all parameters
    used, so `find_unused_parameters=False` works with one task per step (the alternative to the graph traversal
    of `find_unused_parameters=True`)."""
    unused = unused_parameters(model, tasks_run)
    if not unused:
        return torch.zeros((), device=next(model.parameters()).device)
    return sum(p.sum() for p in unused) * 0.0
