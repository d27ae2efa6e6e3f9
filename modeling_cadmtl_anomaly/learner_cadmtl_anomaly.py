"""The self-supervised multi-task anomaly learner (MTL-MAD style) as a transformers model: its network and its
inference; training (proxy batches, losses, the Accelerate loop) and fitting the normal statistics are done by
`cadmtl anomaly train`.

One shared convolutional encoder ends in a task-conditioned mixture-of-experts layer (one gate per proxy task, top-k
experts, load-balancing loss); a shared U-Net decoder and one small head per task give dense predictions. Each
proxy task yields a per-pixel *error map* (`raw_error_maps`): masked-cell inpainting (reconstruction error over 4
complementary passes), per-cell rotation prediction (cross-entropy, 4 passes), synthetic-anomaly segmentation
(predicted probability) and, when the config names a teacher, distillation (the "pseudo-labelling" task: the
learner, itself trained from scratch, regresses a frozen ImageNet teacher's features of normal images, and the
map is the per-position distance of the two L2-normalised feature vectors, summed over the teacher's levels, as
in STPM). `predict` / `forward`: each map is Gaussian-smoothed, standardised with the statistics
of held-out normal images (the `*_location` / `*_scale` buffers; never per image), averaged into the anomaly map,
and the image score is the mean of its top `top_fraction` pixels (or its max).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_cadmtl_anomaly import (
    ENCODER_STRIDE,
    TEACHER_STRIDES,
    TIMM_INSTALL_HINT,
    AnomalyLearnerConfig,
    backbone_normalization,
)
from .features_cadmtl_anomaly import gaussian_blur, image_scores
from .modeling_cadmtl_anomaly import AnomalyOutput, AnomalyPreTrainedModel

LEARNER_AUTO_MAP = {
    "AutoConfig": "configuration_cadmtl_anomaly.AnomalyLearnerConfig",
    "AutoModel": "learner_cadmtl_anomaly.AnomalyLearnerModel",
}


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


class AnomalyLearnerModel(AnomalyPreTrainedModel):
    """Shared encoder + task-conditioned MoE + shared decoder + one dense head per proxy task (see module doc)."""

    config: AnomalyLearnerConfig
    config_class = AnomalyLearnerConfig
    base_model_prefix = "anomaly_learner"
    auto_map = LEARNER_AUTO_MAP

    def __init__(self, config: AnomalyLearnerConfig):
        super().__init__(config)
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
        if "distill" in config.tasks:
            self.teacher = build_teacher(config)
            teacher_info = self.teacher._backbone.feature_info
            strides = [int(r) for r in teacher_info.reduction()]
            bad = [s for s in strides if s not in TEACHER_STRIDES]
            if bad:
                raise ValueError(
                    f"teacher levels {config.teacher_levels} of {config.teacher_backbone} have strides {strides}; "
                    f"the student matches strides {TEACHER_STRIDES} only"
                )
            self.teacher_strides = strides
            # One head per teacher level: the decoder's stride-4 features or the routed encoder's, pooled to stride.
            self.distill_heads = nn.ModuleList(
                nn.Sequential(ConvBlock(c2 if stride == 4 else c3, 2 * width), nn.Conv2d(2 * width, width, 1))
                for stride, width in zip(strides, teacher_info.channels())
            )
        # Location / scale of each task's raw map on held-out normal images: (1, 1) global or (S, S) per pixel.
        shape = (1, 1) if config.standardization == "global" else (config.image_size, config.image_size)
        for task in config.tasks:
            self.register_buffer(f"{task}_location", torch.zeros(shape))
            self.register_buffer(f"{task}_scale", torch.ones(shape))
        self.register_buffer("normal_statistics_images", torch.zeros((), dtype=torch.long))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Layers keep PyTorch's default initialisation; statistics missing from a checkpoint start as "none".
        if module is self:
            for task in self.config.tasks:
                getattr(self, f"{task}_location").zero_()
                getattr(self, f"{task}_scale").fill_(1.0)
            self.normal_statistics_images.zero_()

    @property
    def tasks(self) -> list[str]:
        return list(self.config.tasks)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.config.image_size, self.config.image_size)

    @property
    def normal_statistics(self) -> dict[str, dict[str, torch.Tensor]]:
        """{task: {"location", "scale"}} of the raw maps of normal images; empty until they were fitted."""
        if int(self.normal_statistics_images) == 0:
            return {}
        return {
            task: {"location": getattr(self, f"{task}_location"), "scale": getattr(self, f"{task}_scale")}
            for task in self.config.tasks
        }

    def set_normal_statistics(self, statistics: dict[str, dict[str, torch.Tensor]], num_images: int) -> None:
        """Store per-task {"location", "scale"} fitted on `num_images` normal images."""
        for task in self.config.tasks:
            for key in ("location", "scale"):
                buffer = getattr(self, f"{task}_{key}")
                value = torch.as_tensor(statistics[task][key], dtype=buffer.dtype).to(buffer.device)
                if value.shape != buffer.shape:
                    raise ValueError(
                        f"{task} {key} has shape {tuple(value.shape)}, expected {tuple(buffer.shape)} for "
                        f"standardization={self.config.standardization!r}"
                    )
                buffer.copy_(value)
        self.normal_statistics_images.fill_(int(num_images))

    # -------------------------------------------------------------------------------------------- heads

    def encode(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 4, S, S) inputs -> the shared encoder's features at strides 2, 4 and 8 (before the task's experts)."""
        f1 = self.stem(inputs)
        f2 = self.down2(f1)
        return f1, f2, self.down3(f2)

    def run_task(
        self,
        inputs: torch.Tensor,
        task: str,
        features: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 4, S, S) inputs -> (task output, load-balancing loss). Outputs: inpaint (B, 3, S, S) image,
        rotation (B, 4, g, g) logits per cell, segment (B, 1, S, S) anomaly logits. `features`: `encode(inputs)`
        when already computed (tasks reading the same inputs share it)."""
        f1, f2, f3 = features if features is not None else self.encode(inputs)
        routed, aux, _ = self.moe(f3, task)
        if task == "rotation":
            pooled = F.avg_pool2d(routed, self.config.cell_size // ENCODER_STRIDE)
            return self.rotation_head(pooled), aux
        x = self.up2(torch.cat([F.interpolate(routed, size=f2.shape[-2:], mode="nearest"), f2], 1))
        x = self.up1(torch.cat([F.interpolate(x, size=f1.shape[-2:], mode="nearest"), f1], 1))
        # Heads run at stride 2 (the cost of full-resolution convolutions on CPU); outputs are upsampled.
        out = self.dense_heads[task](x)
        return F.interpolate(out, size=inputs.shape[-2:], mode="bilinear", align_corners=False), aux

    def distill_errors(
        self,
        pixels: torch.Tensor,
        features: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B, 3, S, S) normalised images -> ([(B, h_l, w_l) per teacher level], load-balancing loss): half the
        squared distance between the L2-normalised teacher and student features at each position (0 .. 2).
        `features`: `encode` of the images with their indicator channel, when already computed."""
        with torch.no_grad():
            teacher = self.teacher(self.teacher_pixels(pixels)).feature_maps
        _, f2, f3 = features if features is not None else self.encode(self._with_indicator(pixels))
        routed, aux, _ = self.moe(f3, "distill")
        decoded = None
        errors = []
        for stride, head, target in zip(self.teacher_strides, self.distill_heads, teacher):
            if stride == 4:
                if decoded is None:
                    up = F.interpolate(routed, size=f2.shape[-2:], mode="nearest")
                    decoded = self.up2(torch.cat([up, f2], 1))
                source = decoded
            else:
                source = F.avg_pool2d(routed, stride // ENCODER_STRIDE) if stride > ENCODER_STRIDE else routed
            student = head(source)
            if student.shape[-2:] != target.shape[-2:]:  # odd sizes: the teacher's padding rounds up
                student = F.interpolate(student, size=target.shape[-2:], mode="bilinear", align_corners=False)
            difference = F.normalize(target.float(), dim=1) - F.normalize(student.float(), dim=1)
            errors.append(0.5 * difference.pow(2).sum(1))
        return errors, aux

    def teacher_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels normalised with the learner's mean / std, re-normalised as the teacher's weights expect: (x * s +
        m - tm) / ts. (Computed here, not kept as buffers: a buffer missing from a checkpoint would make
        transformers re-initialise the learner's own buffers, its normal statistics, on loading.)"""
        mean, std = backbone_normalization(self.teacher.config)
        to = {"device": pixels.device, "dtype": pixels.dtype}
        learner_mean = torch.tensor(self.config.image_mean, **to).view(1, 3, 1, 1)
        learner_std = torch.tensor(self.config.image_std, **to).view(1, 3, 1, 1)
        teacher_mean = torch.tensor(mean, **to).view(1, 3, 1, 1)
        teacher_std = torch.tensor(std, **to).view(1, 3, 1, 1)
        return (pixels * learner_std + learner_mean - teacher_mean) / teacher_std

    def train(self, mode: bool = True) -> AnomalyLearnerModel:
        """As `nn.Module.train`, but a distillation teacher stays frozen in eval mode (its batch-norm statistics)."""
        super().train(mode)
        if hasattr(self, "teacher"):
            self.teacher.eval()
        return self

    @staticmethod
    def _with_indicator(pixels: torch.Tensor, indicator: torch.Tensor | None = None) -> torch.Tensor:
        if indicator is None:
            indicator = pixels.new_zeros(pixels.shape[0], 1, *pixels.shape[-2:])
        return torch.cat([pixels, indicator.to(pixels.dtype)], 1)

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
        # Segmentation and distillation read the same unmasked images: one encoder pass serves both.
        clean = self._with_indicator(pixels)
        clean_features = self.encode(clean) if {"segment", "distill"} & set(config.tasks) else None
        if "segment" in config.tasks:
            logits, _ = self.run_task(clean, "segment", clean_features)
            maps["segment"] = logits[:, 0].float().sigmoid()
        if "distill" in config.tasks:
            errors, _ = self.distill_errors(pixels, clean_features)
            maps["distill"] = sum(
                F.interpolate(error[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
                for error in errors
            )
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

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> AnomalyOutput:
        """(B, 3, H, W) normalised images (any size: resized to the model size) -> `AnomalyOutput` with maps at
        (H, W), the per-task maps and the calibrated decisions. Needs fitted normal statistics."""
        if not torch.compiler.is_exporting() and int(self.normal_statistics_images) == 0:
            raise ValueError(
                "no normal statistics: fit them on held-out normal images (cadmtl anomaly train does) first"
            )
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        height, width = pixel_values.shape[-2:]
        raw = self.raw_error_maps(self._resize_input(pixel_values))
        standardised = {
            task: (value - getattr(self, f"{task}_location")) / getattr(self, f"{task}_scale")
            for task, value in raw.items()
        }
        fused = fuse_task_maps(standardised, self.config.task_weights)
        scores = image_scores(fused, self.config.image_score, self.config.top_fraction)

        def resize(maps: torch.Tensor) -> torch.Tensor:
            if tuple(maps.shape[-2:]) == (height, width):
                return maps
            return F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[
                :, 0
            ]

        fused_out = resize(fused)
        return AnomalyOutput(
            anomaly_maps=fused_out,
            image_scores=scores,
            task_maps={task: resize(value) for task, value in standardised.items()},
            raw_task_maps={task: resize(value) for task, value in raw.items()},
            **self._decisions(fused_out, scores),
        )

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor) -> AnomalyOutput:
        """`forward` without gradients (a subclass may give `forward` another role, e.g. training losses)."""
        return AnomalyLearnerModel.forward(self, pixel_values)


__all__ = ["AnomalyLearnerModel", "build_teacher", "fuse_task_maps"]


def build_teacher(config: AnomalyLearnerConfig) -> nn.Module:
    """The frozen teacher of the distill task: a transformers `TimmBackbone` of `config.teacher_backbone` at
    `config.teacher_levels`, randomly initialised (its weights come from the checkpoint or, at training, from the
    pretrained weights cad-mtl loads), without gradients."""
    from transformers import AutoBackbone, TimmBackboneConfig
    from transformers.utils import is_timm_available

    if not is_timm_available():
        raise ImportError(
            f"This learner's distill teacher is the timm network {config.teacher_backbone!r}: {TIMM_INSTALL_HINT}"
        )
    teacher_config = TimmBackboneConfig(
        backbone=config.teacher_backbone,
        out_indices=list(config.teacher_levels),
        use_pretrained_backbone=False,
    )
    teacher = AutoBackbone.from_config(teacher_config).eval()
    return teacher.requires_grad_(False)


def fuse_task_maps(task_maps: dict[str, torch.Tensor], weights: dict[str, float] | None) -> torch.Tensor:
    """The fused map: the mean of the standardised task maps, or their ``weights``-weighted mean."""
    if weights is None:
        return torch.stack(list(task_maps.values())).mean(0)
    used = [(weights[task], value) for task, value in task_maps.items() if weights.get(task, 0.0) > 0]
    return sum(weight * value for weight, value in used) / sum(weight for weight, _ in used)
