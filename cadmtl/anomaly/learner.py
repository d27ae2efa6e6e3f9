"""A self-supervised multi-task anomaly learner trained from scratch on normal images (MTL-MAD style).

One shared convolutional encoder (sized by a preset, ``tiny`` / ``small``) ends in a task-conditioned
mixture-of-experts layer: each proxy task has its own gate over ``num_experts`` pointwise experts, keeps the
``num_experts_per_tok`` (top-k) best per token (weights renormalised) and adds the standard load-balancing auxiliary loss. A shared U-Net
decoder and one small head per task turn the routed features into dense predictions. The proxy tasks, each giving a
per-pixel *error map* at inference:

* ``inpaint``: the cells of a 2 x 2 checkerboard-like pattern (one of 4 phases) are blanked and reconstructed;
  error = squared reconstruction error on the blanked cells (4 complementary passes cover every pixel once).
* ``rotation``: every ``cell_size`` cell is rotated by 0 / 90 / 180 / 270 degrees and the head classifies each
  cell's rotation; error = the cell's cross-entropy, spread over its pixels (4 passes, each cell seen at every
  rotation once).
* ``segment``: synthetic anomalies (``synthesize_anomalies``: smooth-noise blends of another texture, cut-paste
  patches and the dataset's procedural car defects ``dataset_scripts.synthetic.place_defects``) are segmented;
  error = the predicted anomaly probability on the untouched image (1 pass).

Scoring (``predict``): each raw map is Gaussian-smoothed, standardised with statistics of held-out *normal* images
only (``normal_statistics``: global robust location / scale per task = median and 1.4826 * MAD of all their
pixels, or per-pixel mean / std with ``standardization="pixel"``; never per image), the standardised maps are
averaged into the fused anomaly map (with ``task_weights`` when set: :func:`choose_task_weights` derives them from
held-out images, see ``fusion``) and the image score is the mean of its top ``top_fraction`` pixels (or its
max). Thresholds (``image_threshold``, ``pixel_threshold``) are calibrated on held-out normals at a target FPR or by
F1-max on a split with defects, and are stored with the model (``save_pretrained`` / ``from_pretrained``).

>>> model = AnomalyLearner(AnomalyLearnerConfig(preset="tiny", image_size=64))
>>> out = model.predict(torch.zeros(1, 3, 64, 64))  # doctest: +SKIP  (after fit_normal_statistics)
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

from dataset_scripts.synthetic import DefectSpec, place_defects
from dataset_scripts.taxonomy import SYNTHESIS_STYLES

from .metrics import binary_auroc
from .patch_memory import IMAGENET_MEAN, IMAGENET_STD, gaussian_blur

TASKS = ("inpaint", "rotation", "segment")
MODEL_NAME = "model.safetensors"
STATISTICS_NAME = "normal_statistics.safetensors"
CONFIG_NAME = "config.json"
STANDARDIZATIONS = ("global", "pixel")
IMAGE_SCORE_MODES = ("max", "top_mean")
# How the task maps are weighted into the fused map (see choose_task_weights); the first needs no data.
FUSIONS = ("mean", "auroc", "select", "normal_variance")
LEARNER_PRESETS = {
    "tiny": {"channels": [24, 48, 96], "expert_hidden": 192},
    "small": {"channels": [32, 64, 160], "expert_hidden": 320},
}
ENCODER_STRIDE = 8
MAD_TO_STD = 1.4826


class AnomalyLearnerConfig(PretrainedConfig):
    """Settings of an :class:`AnomalyLearner` (shape, proxy tasks, scoring) and its calibrated thresholds.

    Args:
        preset: ``tiny`` or ``small`` (encoder widths, expert width); ``channels`` / ``expert_hidden`` override.
        image_size: square side the model works at (a multiple of ``cell_size``); inputs are resized to it.
        cell_size: side of the inpainting / rotation cells (a multiple of 8, the encoder stride).
        num_experts, num_experts_per_tok: the mixture-of-experts layer (top-k); ``aux_loss_coef`` scales its load-balancing loss.
        anomaly_probability: chance that a training image of the segmentation task receives synthetic anomalies.
        sigma: Gaussian smoothing of each raw error map (pixels at ``image_size``).
        standardization: ``global`` (median / MAD of all normal pixels per task) or ``pixel`` (per-pixel mean /
            std over the normal images, std floored at 10 % of its median).
        image_score: ``top_mean`` (mean of the top ``top_fraction`` fused-map pixels) or ``max``.
        task_weights: ``{task: weight >= 0}`` of the fused map (normalised to sum 1; a task at 0 is left out of
            the fusion but its map is still returned); ``None`` = equal weights. ``fusion`` records the rule
            that chose them (:data:`FUSIONS`).
        image_threshold, pixel_threshold, threshold_method: stored calibration (anomalous: value >= threshold).
    """

    model_type = "cadmtl_anomaly_learner"

    def __init__(
        self,
        preset: str = "tiny",
        channels: Sequence[int] | None = None,
        expert_hidden: int | None = None,
        image_size: int = 128,
        cell_size: int = 16,
        num_experts: int = 4,
        num_experts_per_tok: int = 2,
        aux_loss_coef: float = 0.01,
        tasks: Sequence[str] = TASKS,
        anomaly_probability: float = 0.5,
        hflip: bool = True,
        vflip: bool = False,
        sigma: float = 2.0,
        standardization: str = "global",
        image_score: str = "top_mean",
        top_fraction: float = 0.01,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        task_weights: dict[str, float] | None = None,
        fusion: str = "mean",
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        threshold_method: str | None = None,
        **kwargs,
    ):
        if preset not in LEARNER_PRESETS:
            raise ValueError(f"unknown learner preset {preset!r}; expected one of {sorted(LEARNER_PRESETS)}")
        shape = LEARNER_PRESETS[preset]
        self.preset = preset
        self.channels = list(channels) if channels is not None else list(shape["channels"])
        self.expert_hidden = int(expert_hidden) if expert_hidden is not None else shape["expert_hidden"]
        if len(self.channels) != 3:
            raise ValueError(f"channels must hold 3 widths (strides 2, 4, 8); got {self.channels}")
        if cell_size % ENCODER_STRIDE or image_size % cell_size:
            raise ValueError(
                f"cell_size ({cell_size}) must be a multiple of {ENCODER_STRIDE} and image_size ({image_size}) "
                "a multiple of cell_size"
            )
        if not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_experts={num_experts}]; got {num_experts_per_tok}"
            )
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}; got {list(tasks)}")
        if standardization not in STANDARDIZATIONS:
            raise ValueError(f"standardization must be one of {STANDARDIZATIONS}; got {standardization!r}")
        if image_score not in IMAGE_SCORE_MODES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORE_MODES}; got {image_score!r}")
        self.image_size = int(image_size)
        self.cell_size = int(cell_size)
        self.num_experts = int(num_experts)
        self.num_experts_per_tok = int(num_experts_per_tok)
        self.aux_loss_coef = float(aux_loss_coef)
        self.tasks = [t for t in TASKS if t in tasks]
        self.anomaly_probability = float(anomaly_probability)
        self.hflip = bool(hflip)
        self.vflip = bool(vflip)
        self.sigma = float(sigma)
        self.standardization = standardization
        self.image_score = image_score
        self.top_fraction = float(top_fraction)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}; got {fusion!r}")
        self.fusion = fusion
        self.task_weights = None if task_weights is None else check_task_weights(task_weights, self.tasks)
        self.image_threshold = image_threshold
        self.pixel_threshold = pixel_threshold
        self.threshold_method = threshold_method
        super().__init__(**kwargs)

    @property
    def grid(self) -> int:
        """Cells per side."""
        return self.image_size // self.cell_size


@dataclass
class LearnerOutput:
    """What :meth:`AnomalyLearner.predict` returns (maps at the input size).

    anomaly_maps: (B, H, W) fused map, the (``task_weights``-weighted) mean of the standardised task maps
        (normal pixels ~ 0).
    image_scores: (B,) top-mean (or max) of the fused map at the model size.
    task_maps: {task: (B, H, W)} standardised per-task maps; raw_task_maps: the same before standardisation.
    is_anomalous / defect_masks: the calibrated decisions, None until a threshold is set.
    """

    anomaly_maps: torch.Tensor
    image_scores: torch.Tensor
    task_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    raw_task_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    is_anomalous: torch.Tensor | None = None
    defect_masks: torch.Tensor | None = None


@dataclass
class ProxyBatch:
    """The inputs and targets of the three proxy tasks built from one batch of normal images (model size).

    clean: (B, 3, S, S) normalised images; inpaint_mask: (B, 1, S, S) 1 = blanked; rotation_input: (B, 3, S, S)
    with rotated cells, rotation_labels: (B, g, g) in 0..3; segment_input: (B, 3, S, S) with synthetic anomalies,
    segment_mask: (B, S, S) float 1 = changed pixel.
    """

    clean: torch.Tensor
    inpaint_mask: torch.Tensor
    rotation_input: torch.Tensor
    rotation_labels: torch.Tensor
    segment_input: torch.Tensor
    segment_mask: torch.Tensor

    def to(self, device: torch.device | str) -> ProxyBatch:
        return ProxyBatch(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


# ----------------------------------------------------------------------------------------------------------
# Mixture of experts
# ----------------------------------------------------------------------------------------------------------


def load_balancing_loss(
    router_probs: torch.Tensor, expert_indices: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e``.

    ``router_probs``: (N, E) softmax of the gate; ``expert_indices``: (N, k) the chosen experts; ``f_e`` = the
    fraction of the N * k assignments that went to expert e, ``P_e`` = the mean router probability of e. It is
    1.0 when routing is perfectly balanced and reaches E when every token goes to one expert with probability 1
    (transformers' Mixtral loss is this times k).
    """
    one_hot = F.one_hot(expert_indices, num_experts).to(router_probs.dtype)  # (N, k, E)
    fraction = one_hot.sum(dim=(0, 1)) / one_hot.sum()
    mean_prob = router_probs.mean(dim=0)
    return num_experts * torch.sum(fraction * mean_prob)


class TaskMoE(nn.Module):
    """Token-wise mixture of pointwise-MLP experts with one gate per task (top-k, renormalised weights).

    Every expert runs on every token (E is small), so all parameters get gradients (DDP-safe without
    ``find_unused_parameters``) and the result does not depend on batch composition.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, tasks: Sequence[str]):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.norm = nn.GroupNorm(1, dim)
        self.gates = nn.ModuleDict({task: nn.Linear(dim, num_experts, bias=False) for task in tasks})
        self.w1 = nn.Parameter(torch.randn(num_experts, dim, hidden) * dim**-0.5)
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, dim) * hidden**-0.5 * 0.1)
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))

    def forward(self, x: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (x + routed experts, load-balancing loss, router probabilities (B*H*W, E))."""
        batch, channels, height, width = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(-1, channels)
        probs = self.gates[task](tokens).float().softmax(dim=-1)
        top_values, top_indices = probs.topk(self.top_k, dim=-1)
        combine = torch.zeros_like(probs).scatter(
            1, top_indices, top_values / top_values.sum(-1, keepdim=True)
        )
        hidden = F.gelu(torch.einsum("nc,ech->enh", tokens, self.w1) + self.b1[:, None])
        experts = torch.einsum("enh,ehc->enc", hidden, self.w2) + self.b2[:, None]  # (E, N, C)
        routed = torch.einsum("ne,enc->nc", combine.to(experts.dtype), experts)
        routed = routed.view(batch, height, width, channels).permute(0, 3, 1, 2)
        return x + routed, load_balancing_loss(probs, top_indices, self.num_experts), probs


# ----------------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------------


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(_groups(cout), cout), nn.GELU()
        )


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            ConvBlock(channels, channels),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.GroupNorm(_groups(channels), channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.body(x))


class AnomalyLearner(nn.Module):
    """Shared encoder + task-conditioned MoE + shared decoder + one dense head per proxy task (see module doc)."""

    def __init__(self, config: AnomalyLearnerConfig):
        super().__init__()
        self.config = config
        c1, c2, c3 = config.channels
        # Input: RGB plus an indicator channel (1 = blanked pixel for inpainting, 0 otherwise).
        self.stem = nn.Sequential(ConvBlock(4, c1, 2), ResBlock(c1))  # stride 2
        self.down2 = nn.Sequential(ConvBlock(c1, c2, 2), ResBlock(c2))  # stride 4
        self.down3 = nn.Sequential(ConvBlock(c2, c3, 2), ResBlock(c3), ResBlock(c3))  # stride 8
        self.moe = TaskMoE(
            c3, config.expert_hidden, config.num_experts, config.num_experts_per_tok, config.tasks
        )
        self.up2 = nn.Sequential(ConvBlock(c3 + c2, c2), ResBlock(c2))
        self.up1 = nn.Sequential(ConvBlock(c2 + c1, c1), ResBlock(c1))
        out_channels = {"inpaint": 3, "segment": 1}
        self.dense_heads = nn.ModuleDict(
            {
                task: nn.Sequential(ConvBlock(c1, c1), nn.Conv2d(c1, out_channels[task], 1))
                for task in config.tasks
                if task in out_channels
            }
        )
        if "rotation" in config.tasks:
            self.rotation_head = nn.Sequential(ConvBlock(c3, c3), nn.Conv2d(c3, 4, 1))
        self.normal_statistics: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self.config.tasks)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -------------------------------------------------------------------------------------------- heads

    def run_task(self, inputs: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 4, S, S) inputs -> (task output, load-balancing loss). Outputs: inpaint (B, 3, S, S) image,
        rotation (B, 4, g, g) logits per cell, segment (B, 1, S, S) anomaly logits."""
        f1 = self.stem(inputs)
        f2 = self.down2(f1)
        f3 = self.down3(f2)
        routed, aux, _ = self.moe(f3, task)
        if task == "rotation":
            pooled = F.avg_pool2d(routed, self.config.cell_size // ENCODER_STRIDE)
            return self.rotation_head(pooled), aux
        x = self.up2(torch.cat([F.interpolate(routed, size=f2.shape[-2:], mode="nearest"), f2], 1))
        x = self.up1(torch.cat([F.interpolate(x, size=f1.shape[-2:], mode="nearest"), f1], 1))
        # Heads run at stride 2 (the cost of full-resolution convolutions on CPU); outputs are upsampled.
        out = self.dense_heads[task](x)
        return F.interpolate(out, size=inputs.shape[-2:], mode="bilinear", align_corners=False), aux

    @staticmethod
    def _with_indicator(pixels: torch.Tensor, indicator: torch.Tensor | None = None) -> torch.Tensor:
        if indicator is None:
            indicator = pixels.new_zeros(pixels.shape[0], 1, *pixels.shape[-2:])
        return torch.cat([pixels, indicator.to(pixels.dtype)], 1)

    def forward(self, batch: ProxyBatch) -> dict[str, torch.Tensor]:
        """The proxy losses of one batch in one call (DDP-safe): {task: loss, "moe_aux": mean balancing loss}."""
        losses: dict[str, torch.Tensor] = {}
        aux_losses = []
        if "inpaint" in self.config.tasks:
            mask = batch.inpaint_mask
            out, aux = self.run_task(self._with_indicator(batch.clean * (1 - mask), mask), "inpaint")
            error = (out.float() - batch.clean.float()).pow(2).mean(1, keepdim=True)
            losses["inpaint"] = (error * mask).sum() / mask.sum().clamp_min(1)
            aux_losses.append(aux)
        if "rotation" in self.config.tasks:
            logits, aux = self.run_task(self._with_indicator(batch.rotation_input), "rotation")
            losses["rotation"] = F.cross_entropy(logits.float(), batch.rotation_labels)
            aux_losses.append(aux)
        if "segment" in self.config.tasks:
            logits, aux = self.run_task(self._with_indicator(batch.segment_input), "segment")
            losses["segment"] = focal_loss(logits[:, 0].float(), batch.segment_mask.float())
            aux_losses.append(aux)
        losses["moe_aux"] = torch.stack(aux_losses).mean()
        return losses

    # ---------------------------------------------------------------------------------------- error maps

    @torch.no_grad()
    def raw_error_maps(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) normalised images at the model size -> {task: (B, S, S) smoothed raw error map}.

        Deterministic: inpainting uses the 4 phases of the cell pattern (each pixel blanked once), rotation the
        4 passes of a fixed rotation pattern (each cell seen at every angle), segmentation one pass."""
        config = self.config
        pixels = pixel_values.to(self.device, torch.float32)
        batch, size = pixels.shape[0], config.image_size
        maps: dict[str, torch.Tensor] = {}
        if "inpaint" in config.tasks:
            total = pixels.new_zeros(batch, size, size)
            for phase in range(4):
                mask = inpaint_pattern(config.grid, config.cell_size, torch.full((batch,), phase)).to(pixels)
                out, _ = self.run_task(self._with_indicator(pixels * (1 - mask), mask), "inpaint")
                total += ((out.float() - pixels).pow(2).mean(1, keepdim=True) * mask)[:, 0]
            maps["inpaint"] = total
        if "rotation" in config.tasks:
            total = pixels.new_zeros(batch, config.grid, config.grid)
            for phase in range(4):
                labels = rotation_pattern(config.grid, phase).expand(batch, -1, -1).to(pixels.device)
                logits, _ = self.run_task(
                    self._with_indicator(rotate_cells(pixels, labels, config.cell_size)), "rotation"
                )
                total += F.cross_entropy(logits.float(), labels, reduction="none")
            maps["rotation"] = (
                total.div(4).repeat_interleave(config.cell_size, 1).repeat_interleave(config.cell_size, 2)
            )
        if "segment" in config.tasks:
            logits, _ = self.run_task(self._with_indicator(pixels), "segment")
            maps["segment"] = logits[:, 0].float().sigmoid()
        return {task: gaussian_blur(value, config.sigma) for task, value in maps.items()}

    def _resize_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        if tuple(pixel_values.shape[-2:]) != (size, size):
            pixel_values = F.interpolate(
                pixel_values.float(), size=(size, size), mode="bilinear", antialias=True
            )
        return pixel_values

    @torch.no_grad()
    def fit_normal_statistics(self, normal_pixel_values: Iterable[torch.Tensor], batch_size: int = 8) -> None:
        """Per-task location / scale of the raw maps of NORMAL images (batches or single (3, H, W) images)."""
        collected: dict[str, list[torch.Tensor]] = {task: [] for task in self.config.tasks}
        for batch in _batches(normal_pixel_values, batch_size):
            for task, value in self.raw_error_maps(self._resize_input(batch)).items():
                collected[task].append(value.cpu())
        if not collected[self.config.tasks[0]]:
            raise ValueError("fit_normal_statistics needs at least one normal image")
        statistics = {}
        for task, values in collected.items():
            stack = torch.cat(values)  # (N, S, S)
            if self.config.standardization == "global":
                flat = stack.flatten().double()
                location = flat.median()
                scale = MAD_TO_STD * (flat - location).abs().median()
                if scale <= 0:
                    scale = flat.std()
                location, scale = location.float().view(1, 1), scale.float().clamp_min(1e-6).view(1, 1)
            else:
                location = stack.mean(0)
                std = (
                    stack.std(0, unbiased=stack.shape[0] > 1)
                    if stack.shape[0] > 1
                    else torch.zeros_like(location)
                )
                scale = std.clamp_min(max(float(std.median()) * 0.1, 1e-6))
            statistics[task] = {"location": location, "scale": scale}
        self.normal_statistics = statistics

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor) -> LearnerOutput:
        """(B, 3, H, W) normalised images (any size: resized to the model size) -> maps at (H, W), see
        :class:`LearnerOutput`. Needs :meth:`fit_normal_statistics` (or ``from_pretrained``) first."""
        if not self.normal_statistics:
            raise ValueError(
                "no normal statistics: call fit_normal_statistics(normal images) or from_pretrained"
            )
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        height, width = pixel_values.shape[-2:]
        raw = self.raw_error_maps(self._resize_input(pixel_values))
        standardised = {}
        for task, value in raw.items():
            stats = self.normal_statistics[task]
            standardised[task] = (value - stats["location"].to(value)) / stats["scale"].to(value)
        fused = fuse_task_maps(standardised, self.config.task_weights)
        scores = image_scores(fused, self.config.image_score, self.config.top_fraction)

        def resize(maps: torch.Tensor) -> torch.Tensor:
            if tuple(maps.shape[-2:]) == (height, width):
                return maps
            return F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[
                :, 0
            ]

        fused_out = resize(fused)
        image_threshold, pixel_threshold = self.config.image_threshold, self.config.pixel_threshold
        return LearnerOutput(
            anomaly_maps=fused_out,
            image_scores=scores,
            task_maps={task: resize(value) for task, value in standardised.items()},
            raw_task_maps={task: resize(value) for task, value in raw.items()},
            is_anomalous=None if image_threshold is None else scores >= image_threshold,
            defect_masks=None if pixel_threshold is None else fused_out >= pixel_threshold,
        )

    # ------------------------------------------------------------------------------------- serialisation

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config.json (settings + thresholds), model.safetensors and normal_statistics.safetensors."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        state = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        save_file(state, directory / MODEL_NAME)
        if self.normal_statistics:
            flat = {
                f"{task}.{key}": value.detach().cpu().contiguous()
                for task, stats in self.normal_statistics.items()
                for key, value in stats.items()
            }
            save_file(flat, directory / STATISTICS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> AnomalyLearner:
        """Restore a learner written by :meth:`save_pretrained` (weights, statistics, thresholds), in eval mode."""
        directory = Path(directory)
        model = cls(AnomalyLearnerConfig.from_pretrained(directory))
        model.load_state_dict(load_file(directory / MODEL_NAME), strict=True)
        if (directory / STATISTICS_NAME).exists():
            statistics: dict[str, dict[str, torch.Tensor]] = {}
            for name, value in load_file(directory / STATISTICS_NAME).items():
                task, key = name.split(".")
                statistics.setdefault(task, {})[key] = value
            model.normal_statistics = statistics
        return model.eval()


def _batches(items: Iterable[torch.Tensor] | torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    pending: list[torch.Tensor] = []
    for item in items:
        if item.ndim == 4:
            yield from (item[i : i + batch_size] for i in range(0, item.shape[0], batch_size))
            continue
        pending.append(item)
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


def check_task_weights(weights: dict[str, float], tasks: Sequence[str]) -> dict[str, float]:
    """``weights`` normalised to sum 1 over ``tasks`` (missing tasks get 0); clear errors for bad values."""
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        raise ValueError(f"task_weights name tasks {unknown} that the model does not have ({list(tasks)})")
    values = {task: float(weights.get(task, 0.0)) for task in tasks}
    if any(not math.isfinite(v) or v < 0 for v in values.values()) or sum(values.values()) <= 0:
        raise ValueError(f"task_weights must be finite, >= 0 and not all 0; got {weights}")
    total = sum(values.values())
    return {task: value / total for task, value in values.items()}


def fuse_task_maps(task_maps: dict[str, torch.Tensor], weights: dict[str, float] | None) -> torch.Tensor:
    """The fused map: the mean of the standardised task maps, or their ``weights``-weighted mean."""
    if weights is None:
        return torch.stack(list(task_maps.values())).mean(0)
    used = [(weights[task], value) for task, value in task_maps.items() if weights.get(task, 0.0) > 0]
    return sum(weight * value for weight, value in used) / sum(weight for weight, _ in used)


def choose_task_weights(
    task_maps: dict[str, torch.Tensor],
    is_anomalous: Sequence[bool] | np.ndarray | None,
    method: str,
    image_score: str = "top_mean",
    top_fraction: float = 0.01,
) -> dict[str, float] | None:
    """Fusion weights from the standardised task maps ``{task: (N, S, S)}`` of held-out images.

    * ``mean``: ``None`` (equal weights).
    * ``auroc`` (needs defects): each task weighted by how far its own image score separates the anomalous
      from the normal images, ``max(AUROC - 0.5, 0)``; equal weights if no task beats chance.
    * ``select`` (needs defects): the equal-weight subset of tasks whose fused image score has the highest
      AUROC (ties: the larger subset), i.e. tasks that do not help on these images are dropped.
    * ``normal_variance`` (normal images only, ``is_anomalous`` may be None; anomalous rows are ignored):
      inverse-variance weights ``1 / var`` of each task's image scores over the normal images: a task whose
      normal images already spread over a wide range of scores is noise for the image decision.
    """
    if method not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}; got {method!r}")
    tasks = list(task_maps)
    count = next(iter(task_maps.values())).shape[0]
    labels = np.zeros(count, bool) if is_anomalous is None else np.asarray(is_anomalous, bool)
    if labels.shape != (count,):
        raise ValueError(f"is_anomalous has {labels.shape} labels for {count} images")
    if method == "mean":
        return None
    scores = {
        t: image_scores(m.float(), image_score, top_fraction).double().cpu().numpy()
        for t, m in task_maps.items()
    }
    if method == "normal_variance":
        if (~labels).sum() < 2:
            raise ValueError("fusion normal_variance needs at least 2 normal images")
        variances = {t: float(np.var(s[~labels], ddof=1)) for t, s in scores.items()}
        return check_task_weights({t: 1.0 / max(v, 1e-12) for t, v in variances.items()}, tasks)
    if labels.all() or not labels.any():
        raise ValueError(
            f"fusion {method} needs anomalous and normal images (a validation split with defects)"
        )
    if method == "auroc":
        excess = {t: max(binary_auroc(s, labels) - 0.5, 0.0) for t, s in scores.items()}
        return None if not any(excess.values()) else check_task_weights(excess, tasks)
    best, best_auroc = None, -1.0
    for size in range(len(tasks), 0, -1):
        for subset in itertools.combinations(tasks, size):
            fused = torch.stack([task_maps[t].float() for t in subset]).mean(0)
            auroc = binary_auroc(
                image_scores(fused, image_score, top_fraction).double().cpu().numpy(), labels
            )
            if auroc > best_auroc:
                best, best_auroc = subset, auroc
    return check_task_weights(dict.fromkeys(best, 1.0), tasks)


def image_scores(maps: torch.Tensor, mode: str = "top_mean", top_fraction: float = 0.01) -> torch.Tensor:
    """(B, H, W) -> (B,): the max or the mean of the top `top_fraction` pixels."""
    flat = maps.flatten(1)
    if mode == "max":
        return flat.max(dim=1).values
    count = max(1, math.ceil(top_fraction * flat.shape[1]))
    return flat.topk(count, dim=1).values.mean(dim=1)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (mean over pixels), as DRAEM's segmentation loss."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = torch.exp(-bce)
    return ((1 - p_true) ** gamma * bce).mean()


# ----------------------------------------------------------------------------------------------------------
# Proxy-task inputs
# ----------------------------------------------------------------------------------------------------------


def inpaint_pattern(grid: int, cell_size: int, phases: torch.Tensor) -> torch.Tensor:
    """(B,) phases in 0..3 -> (B, 1, S, S) masks: cell (i, j) is blanked when 2 * (i % 2) + (j % 2) == phase."""
    index = torch.arange(grid)
    cell_phase = 2 * (index[:, None] % 2) + (index[None, :] % 2)  # (g, g)
    cells = (cell_phase[None] == phases.view(-1, 1, 1)).float()
    return cells.repeat_interleave(cell_size, 1).repeat_interleave(cell_size, 2)[:, None]


def rotation_pattern(grid: int, phase: int) -> torch.Tensor:
    """(1, g, g) rotation labels of inference pass `phase`: (phase + i + 2 j) % 4 (each cell, all 4 angles)."""
    index = torch.arange(grid)
    return ((phase + index[:, None] + 2 * index[None, :]) % 4)[None].long()


def rotate_cells(pixels: torch.Tensor, labels: torch.Tensor, cell_size: int) -> torch.Tensor:
    """Rotate each cell of (B, C, S, S) by labels (B, g, g) * 90 degrees (counter-clockwise)."""
    batch, channels, size, _ = pixels.shape
    grid = size // cell_size
    cells = pixels.view(batch, channels, grid, cell_size, grid, cell_size).permute(0, 2, 4, 1, 3, 5)
    rotated = torch.stack([torch.rot90(cells, k, dims=(-2, -1)) for k in range(4)])  # (4, B, g, g, C, c, c)
    index = labels[None, ..., None, None, None].expand(1, -1, -1, -1, channels, cell_size, cell_size)
    chosen = rotated.gather(0, index.to(pixels.device))[0]
    return chosen.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, size, size)


def smooth_noise_mask(size: int, rng: np.random.Generator, threshold: float | None = None) -> torch.Tensor:
    """A blobby (S, S) bool mask: thresholded bicubic-upsampled random grid (Perlin-style, DRAEM's role)."""
    resolution = int(rng.choice([2, 4, 8, 16]))
    grid = torch.from_numpy(rng.standard_normal((1, 1, resolution + 1, resolution + 1)).astype(np.float32))
    noise = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)[0, 0]
    noise = (noise - noise.mean()) / noise.std().clamp_min(1e-6)
    return noise > (threshold if threshold is not None else float(rng.uniform(0.8, 1.6)))


def synthesize_anomalies(
    images: torch.Tensor,
    rng: np.random.Generator,
    probability: float = 0.5,
    min_change: int = 12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic anomalies on (B, 3, S, S) uint8 normal images -> (images, masks (B, S, S) bool).

    Each image, with `probability`, gets one of: a smooth-noise blob blended with another texture (another image
    of the batch, flipped / rotated / re-lit, or a noisy flat colour), a cut-paste patch of itself (rotated,
    re-lit), or 1-2 procedural defects from ``dataset_scripts.synthetic.place_defects``. Pixels whose largest
    channel change is under `min_change` grey levels are restored, so the mask is exactly the set of changed
    pixels: ``masks == (out != images).any(1)``.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"synthesize_anomalies expects uint8 images; got {images.dtype}")
    out = images.clone()
    batch, _, size, _ = images.shape
    for b in range(batch):
        if rng.random() >= probability:
            continue
        original = images[b].float()
        kind = rng.choice(["blend", "cutpaste", "defect"], p=[0.4, 0.2, 0.4])
        low = max(0.05, 3.5 / size)  # place_defects draws radii of at least 3 px
        if kind == "defect" and low < 0.2:
            count = int(rng.integers(1, 3))
            specs = [DefectSpec(str(rng.choice(SYNTHESIS_STYLES))) for _ in range(count)]
            painted, _ = place_defects(
                images[b].permute(1, 2, 0).numpy(), specs, rng, radius_range=(low, max(0.16, low + 0.04))
            )
            candidate = torch.from_numpy(painted).permute(2, 0, 1).float()
        elif kind in ("blend", "defect"):
            region = smooth_noise_mask(size, rng)
            if rng.random() < 0.6:
                source = images[int(rng.integers(batch))].float()
                source = torch.rot90(source, int(rng.integers(4)), dims=(1, 2))
                if rng.random() < 0.5:
                    source = source.flip(2)
                source = source * float(rng.uniform(0.4, 1.6)) + float(rng.uniform(-40, 40))
            else:
                colour = torch.from_numpy(rng.uniform(0, 255, (3, 1, 1)).astype(np.float32))
                noise = torch.from_numpy(
                    rng.normal(0, float(rng.uniform(2, 30)), (1, size, size)).astype(np.float32)
                )
                source = colour + noise
            beta = float(rng.uniform(0.4, 1.0))
            candidate = torch.where(region, (1 - beta) * original + beta * source, original)
        else:
            side = int(rng.integers(max(4, size // 16), max(5, size // 4)))
            other = int(rng.integers(max(4, size // 16), max(5, size // 4)))
            height, width = (side, other) if rng.random() < 0.5 else (other, side)
            y0, x0 = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
            patch = original[:, y0 : y0 + height, x0 : x0 + width]
            turns = int(rng.choice([0, 2])) if height != width else int(rng.integers(4))
            patch = torch.rot90(patch, turns, dims=(1, 2)) * float(rng.uniform(0.6, 1.4))
            ph, pw = patch.shape[-2:]
            y1, x1 = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
            candidate = original.clone()
            candidate[:, y1 : y1 + ph, x1 : x1 + pw] = patch
        candidate = candidate.round().clamp(0, 255).to(torch.uint8)
        changed = (candidate.short() - images[b].short()).abs().amax(0) >= min_change
        out[b] = torch.where(changed[None], candidate, images[b])
    masks = (out != images).any(1)
    return out, masks


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float32 normalised."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def make_proxy_batch(images: torch.Tensor, config: AnomalyLearnerConfig, seed: int) -> ProxyBatch:
    """The proxy-task inputs and targets of (B, 3, S, S) uint8 normal images; a function of `seed` only."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    batch = images.shape[0]
    if config.hflip or config.vflip:
        flips = torch.rand(batch, 2, generator=generator) < 0.5
        images = images.clone()
        for b in range(batch):
            if config.hflip and flips[b, 0]:
                images[b] = images[b].flip(2)
            if config.vflip and flips[b, 1]:
                images[b] = images[b].flip(1)
    clean = normalize(images, config.image_mean, config.image_std)
    phases = torch.randint(0, 4, (batch,), generator=generator)
    inpaint_mask = inpaint_pattern(config.grid, config.cell_size, phases)
    labels = torch.randint(0, 4, (batch, config.grid, config.grid), generator=generator)
    rotation_input = rotate_cells(clean, labels, config.cell_size)
    anomalous, masks = synthesize_anomalies(images, rng, config.anomaly_probability)
    return ProxyBatch(
        clean=clean,
        inpaint_mask=inpaint_mask,
        rotation_input=rotation_input,
        rotation_labels=labels,
        segment_input=normalize(anomalous, config.image_mean, config.image_std),
        segment_mask=masks.float(),
    )


def images_to_uint8(images: Sequence, size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) uint8 (bilinear, antialiased resize)."""
    tensors = []
    for image in images:
        array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        resized = F.interpolate(
            array[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )[0]
        tensors.append(resized.round().clamp(0, 255).to(torch.uint8))
    return torch.stack(tensors)
