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

The network and its inference (error maps, standardisation, fusion, ``predict``) are the Hub model
``modeling_cadmtl_anomaly.AnomalyLearnerModel``, so a saved learner runs with ``AutoModel.from_pretrained(DIR,
trust_remote_code=True)`` alone; this module adds the training side (proxy batches, losses, normal statistics).

Scoring (``predict``): each raw map is Gaussian-smoothed, standardised with statistics of held-out *normal* images
only (``normal_statistics``: global robust location / scale per task = median and 1.4826 * MAD of all their
pixels, or per-pixel mean / std with ``standardization="pixel"``; never per image), the standardised maps are
averaged into the fused anomaly map and the image score is the mean of its top ``top_fraction`` pixels (or its
max). Thresholds (``image_threshold``, ``pixel_threshold``) are calibrated on held-out normals at a target FPR or by
F1-max on a split with defects, and are stored with the model (``save_pretrained`` / ``from_pretrained``).

>>> model = AnomalyLearner(AnomalyLearnerConfig(preset="tiny", image_size=64))
>>> out = model.predict(torch.zeros(1, 3, 64, 64))  # doctest: +SKIP  (after fit_normal_statistics)
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dataset_scripts.synthetic import DefectSpec, place_defects
from dataset_scripts.taxonomy import SYNTHESIS_STYLES
from modeling_cadmtl_anomaly import AnomalyLearnerConfig, AnomalyLearnerModel, AnomalyOutput
from modeling_cadmtl_anomaly.configuration_cadmtl_anomaly import (
    DEFAULT_TASKS,
    ENCODER_STRIDE,
    FUSIONS,
    LEARNER_PRESETS,
    STANDARDIZATIONS,
    TASKS,
    check_task_weights,
)
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import image_scores, tile_boxes
from modeling_cadmtl_anomaly.learner_cadmtl_anomaly import (
    TaskMoE,
    fuse_task_maps,
    inpaint_pattern,
    load_balancing_loss,
    rotate_cells,
    rotation_pattern,
)

from .metrics import binary_auroc
from .patch_memory import iter_batches

__all__ = [
    "DEFAULT_TASKS",
    "ENCODER_STRIDE",
    "FUSIONS",
    "LEARNER_PRESETS",
    "STANDARDIZATIONS",
    "SYNTHESIS_MIXES",
    "TASKS",
    "AnomalyLearner",
    "AnomalyLearnerConfig",
    "LearnerOutput",
    "ProxyBatch",
    "TaskMoE",
    "check_task_weights",
    "choose_task_weights",
    "focal_loss",
    "fuse_task_maps",
    "image_scores",
    "images_to_uint8",
    "inpaint_pattern",
    "load_balancing_loss",
    "make_proxy_batch",
    "normal_statistics_of",
    "normalize",
    "rotate_cells",
    "rotation_pattern",
    "synthesize_anomalies",
]

MAD_TO_STD = 1.4826
LEGACY_STATISTICS_NAME = "normal_statistics.safetensors"  # the earlier layout kept them out of the weights
LearnerOutput = AnomalyOutput  # what `predict` returns


@dataclass
class ProxyBatch:
    """The inputs and targets of the proxy tasks built from one batch of normal images (model size); distill reads
    `clean` (its targets are the teacher's features, computed in the model).

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


class AnomalyLearner(AnomalyLearnerModel):
    """The Hub learner (network, error maps, `predict`, save / load) plus training: `forward(ProxyBatch)` returns
    the proxy losses (the Accelerate loop calls it), `fit_normal_statistics` fits the standardisation. Inference
    goes through `predict` (`AnomalyLearnerModel.forward`)."""

    def forward(self, batch: ProxyBatch) -> dict[str, torch.Tensor]:  # type: ignore[override]
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
        if "distill" in self.config.tasks:
            errors, aux = self.distill_errors(batch.clean)
            losses["distill"] = torch.stack([error.mean() for error in errors]).mean()
            aux_losses.append(aux)
        losses["moe_aux"] = torch.stack(aux_losses).mean()
        return losses

    @torch.no_grad()
    def fit_normal_statistics(self, normal_pixel_values: Iterable[torch.Tensor], batch_size: int = 8) -> None:
        """Per-task location / scale of the raw maps of NORMAL images (batches or single (3, H, W) images)."""
        collected: dict[str, list[torch.Tensor]] = {task: [] for task in self.config.tasks}
        for batch in iter_batches(normal_pixel_values, batch_size):
            for task, value in self.raw_error_maps(self._resize_input(batch)).items():
                collected[task].append(value.cpu())
        if not collected[self.config.tasks[0]]:
            raise ValueError("fit_normal_statistics needs at least one normal image")
        statistics = {
            task: normal_statistics_of(torch.cat(values), self.config.standardization)
            for task, values in collected.items()
        }
        self.set_normal_statistics(statistics, len(torch.cat(collected[self.config.tasks[0]])))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any
    ) -> Any:
        """A saved learner in eval mode; a folder of the earlier layout (statistics in
        normal_statistics.safetensors) loads too. With `output_loading_info=True`, `(learner, loading_info)`."""
        legacy = Path(pretrained_model_name_or_path) / LEGACY_STATISTICS_NAME
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model, extra = (loaded[0], loaded[1:]) if isinstance(loaded, tuple) else (loaded, ())
        if legacy.is_file() and not model.normal_statistics:
            statistics: dict[str, dict[str, torch.Tensor]] = {}
            for name, value in load_file(legacy).items():
                task, key = name.split(".")
                statistics.setdefault(task, {})[key] = value
            model.set_normal_statistics(statistics, num_images=1)
            if extra:  # the statistics buffers came from the legacy file: they are not missing
                filled = {f"{task}_{key}" for task in statistics for key in ("location", "scale")}
                filled.add("normal_statistics_images")
                info = extra[0]
                info["missing_keys"] = type(info["missing_keys"])(
                    key for key in info["missing_keys"] if key not in filled
                )
        return (model.eval(), *extra) if extra else model.eval()


def normal_statistics_of(maps: torch.Tensor, standardization: str) -> dict[str, torch.Tensor]:
    """{"location", "scale"} of one task's raw maps (N, S, S) of normal images: ``global`` = median and
    1.4826 * MAD of all their pixels, shape (1, 1); ``pixel`` = per-position mean and std, shape (S, S), the std
    floored at a tenth of its median (a position that never varied must not explode)."""
    if standardization not in STANDARDIZATIONS:
        raise ValueError(f"standardization must be one of {STANDARDIZATIONS}; got {standardization!r}")
    if standardization == "global":
        flat = maps.flatten().double()
        location = flat.median()
        scale = MAD_TO_STD * (flat - location).abs().median()
        if scale <= 0:
            scale = flat.std()
        return {
            "location": location.float().view(1, 1),
            "scale": scale.float().clamp_min(1e-6).view(1, 1),
        }
    location = maps.mean(0)
    std = maps.std(0, unbiased=True) if maps.shape[0] > 1 else torch.zeros_like(location)
    return {"location": location, "scale": std.clamp_min(max(float(std.median()) * 0.1, 1e-6))}


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss (mean over pixels), as DRAEM's segmentation loss."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = torch.exp(-bce)
    return ((1 - p_true) ** gamma * bce).mean()


# ----------------------------------------------------------------------------------------------------------
# Proxy-task inputs
# ----------------------------------------------------------------------------------------------------------


def smooth_noise_mask(size: int, rng: np.random.Generator, threshold: float | None = None) -> torch.Tensor:
    """A blobby (S, S) bool mask: thresholded bicubic-upsampled random grid (Perlin-style, DRAEM's role)."""
    resolution = int(rng.choice([2, 4, 8, 16]))
    grid = torch.from_numpy(rng.standard_normal((1, 1, resolution + 1, resolution + 1)).astype(np.float32))
    noise = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)[0, 0]
    noise = (noise - noise.mean()) / noise.std().clamp_min(1e-6)
    return noise > (threshold if threshold is not None else float(rng.uniform(0.8, 1.6)))


# Synthetic-anomaly mixes: kind -> probability. `mixed` is the original recipe; `varied` adds the shapes the tile
# and car defects show that `mixed` lacks: large smooth brightness changes (unevenness), thin curved strokes
# (cracks, scratches, fraying fibres) and damage along one image edge (fraying, breaks).
SYNTHESIS_MIXES: dict[str, dict[str, float]] = {
    "mixed": {"blend": 0.4, "cutpaste": 0.2, "defect": 0.4},
    "varied": {"blend": 0.25, "cutpaste": 0.1, "defect": 0.2, "smooth": 0.15, "strokes": 0.15, "edge": 0.15},
    # `varied` without the procedural car defects, which also paint the `_ad` configs' synthetic test defects: what
    # the scorer's defect head trains on (`cadmtl.anomaly.defect_head`)
    "texture": {"blend": 0.3, "cutpaste": 0.15, "smooth": 0.2, "strokes": 0.2, "edge": 0.15},
}


def synthesize_anomalies(
    images: torch.Tensor,
    rng: np.random.Generator,
    probability: float = 0.5,
    min_change: int = 12,
    mix: str = "mixed",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic anomalies on (B, 3, S, S) uint8 normal images -> (images, masks (B, S, S) bool).

    Each image, with `probability`, gets one of: a smooth-noise blob blended with another texture (another image
    of the batch, flipped / rotated / re-lit, or a noisy flat colour), a cut-paste patch of itself (rotated,
    re-lit), or 1-2 procedural defects from ``dataset_scripts.synthetic.place_defects``; with ``mix="varied"``
    also a large soft-edged brightness change, 1-3 thin curved strokes, or a blend along one image edge
    (``SYNTHESIS_MIXES``). Pixels whose largest
    channel change is under `min_change` grey levels are restored, so the mask is exactly the set of changed
    pixels: ``masks == (out != images).any(1)``.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"synthesize_anomalies expects uint8 images; got {images.dtype}")
    if mix not in SYNTHESIS_MIXES:
        raise ValueError(f"synthesis mix must be one of {sorted(SYNTHESIS_MIXES)}; got {mix!r}")
    kinds, chances = zip(*SYNTHESIS_MIXES[mix].items(), strict=True)
    out = images.clone()
    batch, _, size, _ = images.shape
    for b in range(batch):
        if rng.random() >= probability:
            continue
        original = images[b].float()
        kind = rng.choice(list(kinds), p=list(chances))
        low = max(0.05, 3.5 / size)  # place_defects draws radii of at least 3 px
        if kind == "defect" and low < 0.2:
            count = int(rng.integers(1, 3))
            specs = [DefectSpec(str(rng.choice(SYNTHESIS_STYLES))) for _ in range(count)]
            painted, _ = place_defects(
                images[b].permute(1, 2, 0).numpy(), specs, rng, radius_range=(low, max(0.16, low + 0.04))
            )
            candidate = torch.from_numpy(painted).permute(2, 0, 1).float()
        elif kind == "smooth":
            candidate = uneven_brightness(original, rng)
        elif kind == "strokes":
            candidate = thin_strokes(original, rng)
        elif kind in ("blend", "defect", "edge"):
            region = smooth_noise_mask(size, rng)
            if kind == "edge":
                region = region | smooth_noise_mask(size, rng, threshold=float(rng.uniform(0.0, 0.8)))
                region = region & edge_band(size, rng)
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


def edge_band(size: int, rng: np.random.Generator) -> torch.Tensor:
    """(S, S) bool: a band 4-20 % of the image wide along one random side."""
    width = max(2, int(rng.uniform(0.04, 0.2) * size))
    band = torch.zeros(size, size, dtype=torch.bool)
    band[:width] = True
    return torch.rot90(band, int(rng.integers(4)))


def uneven_brightness(original: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A large soft-edged region (low-frequency noise) darkened or brightened by 15-50 %: an uneven surface."""
    size = original.shape[-1]
    grid = torch.from_numpy(rng.standard_normal((1, 1, 3, 3)).astype(np.float32))
    noise = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)[0, 0]
    noise = (noise - noise.mean()) / noise.std().clamp_min(1e-6)
    weight = torch.sigmoid((noise - float(rng.uniform(0.3, 1.2))) * float(rng.uniform(2, 6)))
    factor = float(rng.uniform(0.5, 0.85)) if rng.random() < 0.5 else float(rng.uniform(1.15, 1.5))
    return original * (1 + (factor - 1) * weight[None])


def thin_strokes(original: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """1-3 random-walk polylines 1-3 px wide, darker or brighter than the surface: cracks, scratches, fibres."""
    from PIL import Image, ImageDraw

    size = original.shape[-1]
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 4))):
        point = rng.uniform(0, size, 2)
        angle = rng.uniform(0, 2 * np.pi)
        points = [tuple(point)]
        for _ in range(int(rng.integers(3, 10))):
            angle += rng.normal(0, 0.5)
            point = point + rng.uniform(size / 24, size / 8) * np.array([np.cos(angle), np.sin(angle)])
            points.append(tuple(point))
        draw.line(points, fill=255, width=int(rng.integers(1, max(2, size // 48) + 1)))
    stroke = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]
    factor = float(rng.uniform(0.15, 0.6)) if rng.random() < 0.75 else float(rng.uniform(1.4, 2.2))
    return original * (1 + (factor - 1) * stroke)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float32 normalised."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def make_proxy_batch(
    images: torch.Tensor, config: AnomalyLearnerConfig, seed: int, synthesis: str = "mixed"
) -> ProxyBatch:
    """The proxy-task inputs and targets of (B, 3, S, S) uint8 normal images; a function of `seed` only.
    `synthesis`: the synthetic-anomaly mix of the segmentation task (``SYNTHESIS_MIXES``)."""
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
    anomalous, masks = synthesize_anomalies(images, rng, config.anomaly_probability, mix=synthesis)
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


def tile_crops(images: Sequence, tile_size: int | None, overlap: int = 0) -> list:
    """The images as the learner sees them: with ``tile_size``, every image cut into the overlapping square tiles
    the processor scores (``tile_boxes``: pixels of the original, one scale for every image), in order; None: the
    images themselves."""
    if tile_size is None:
        return list(images)
    return [
        image.crop(box)
        for image in images
        for box in tile_boxes(image.height, image.width, tile_size, overlap)
    ]


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
