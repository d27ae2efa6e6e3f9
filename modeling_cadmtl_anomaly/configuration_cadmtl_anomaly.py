"""Configurations of the normal-only anomaly models: the patch-memory scorer and the from-scratch learner.

Both record how their inputs are prepared (`image_size`, `image_mean`, `image_std`) and the calibrated decisions
(`image_threshold`, `pixel_threshold`: anomalous when the value is at or above them; None until calibrated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .features_cadmtl_anomaly import check_ivf_arguments, check_tile_settings

IMAGENET_MEAN = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD = tuple(IMAGENET_DEFAULT_STD)
# A timm backbone (transformers' `TimmBackbone`, e.g. cad-mtl's ImageNet EfficientNet-Lite) needs timm to be built.
# timm architectures whose pretrained weights expect pixels in [-1, 1] (mean = std = 0.5).
MINUS_ONE_ONE_TIMM = ("tf_efficientnet_lite",)
TIMM_INSTALL_HINT = "pip install timm (or cad-mtl's `pretrained` extra: pip install 'cad-mtl[pretrained]')"


def backbone_normalization(backbone_config: PreTrainedConfig) -> tuple[list[float], list[float]]:
    """(mean, std) of the pixels the backbone's pretrained weights expect: 0.5 / 0.5 (pixels in [-1, 1]) for the
    TF-trained EfficientNet-Lite weights of a timm `tf_efficientnet_lite*` backbone (timm's pretrained config says
    the same), ImageNet's otherwise. (A copy of `modeling_cadmtl.configuration_cadmtl.backbone_normalization`: Hub
    packages are self-contained; a test keeps them equal.)"""
    if getattr(backbone_config, "backbone", None) and backbone_config.backbone.startswith(MINUS_ONE_ONE_TIMM):
        return [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


IMAGE_SCORE_MODES = ("max", "top_mean")
# Flipped views whose maps a patch-memory scorer may average with the upright view's: name -> the flipped dims of an
# (..., H, W) tensor.
MAP_FLIPS = {"h": (-1,), "v": (-2,), "hv": (-2, -1)}
METRICS = ("l2", "cosine")
SUPPORTED_BACKBONES = ("dinov3_vit", "dinov3_convnext", "timm_backbone")

# The learner's proxy tasks and shapes. `distill` (the seed's "pseudo-labelling" task) regresses a frozen
# ImageNet teacher's features of normal images, so it needs a teacher (`teacher_backbone`): the config's default
# leaves it out; `cadmtl anomaly train` adds it where the `pretrained` extra is installed.
TASKS = ("inpaint", "rotation", "segment", "distill")
DEFAULT_TASKS = ("inpaint", "rotation", "segment")
# Teacher feature strides the learner's student heads can match (its decoder at 4, its encoder at 8, pooled beyond).
TEACHER_STRIDES = (4, 8, 16, 32)
STANDARDIZATIONS = ("global", "pixel")
# How the learner's standardised task maps are weighted into the fused map (the rule that chose `task_weights`;
# `cadmtl.anomaly.learner.choose_task_weights` applies them); "mean" needs no data.
FUSIONS = ("mean", "auroc", "select", "normal_variance")
LEARNER_PRESETS = {
    "tiny": {"channels": [24, 48, 96], "expert_hidden": 192},
    "small": {"channels": [32, 64, 160], "expert_hidden": 320},
}
ENCODER_STRIDE = 8


def check_map_flips(flips: Sequence[str] | None) -> list[str]:
    """`map_flips` as a list of distinct names of `MAP_FLIPS`; a clear error for anything else."""
    flips = [str(flip) for flip in (flips or [])]
    unknown = [flip for flip in flips if flip not in MAP_FLIPS]
    if unknown or len(set(flips)) != len(flips):
        raise ValueError(f"map_flips must be distinct names among {sorted(MAP_FLIPS)}; got {flips}")
    return flips


class PatchMemoryConfig(PreTrainedConfig):
    r"""
    Configuration of a [`PatchMemoryModel`]: a DINOv3 backbone, which of its layers give the patch features, the
    size of the memory bank of normal patches and how distances become maps and image scores.

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            A `DINOv3ViTConfig` (default, shaped like ViT-S/16), `DINOv3ConvNextConfig` or `TimmBackboneConfig`
            (e.g. `tf_efficientnet_lite0`, built by transformers' `TimmBackbone`; needs timm).
        backbone_class (`str`, *optional*):
            The transformers class of the backbone (`DINOv3ViTModel`, `DINOv3ViTBackbone`, ...); None: `AutoModel`.
        layers (`list[int]`, *optional*):
            1-based backbone layers whose patch features are concatenated; None: (depth // 2, 3 * depth // 4).
            A timm backbone's layers are its feature levels (`out_indices`); None: its first two.
        aggregate, layer_norm (`bool`): 3x3 neighbourhood averaging of the features; the backbone's final norm on
            every chosen ViT layer.
        image_size (`list[int]`, *optional*, defaults to `[224, 224]`):
            (height, width) the bank was fitted at; inputs of another size are resized to it.
        image_score (`str`): `"top_mean"` (mean of the top `top_fraction` patch distances) or `"max"`.
        sigma (`float`): Gaussian smoothing of the maps, in input pixels.
        metric (`str`): `"l2"` (PatchCore) or `"cosine"` (AnomalyDINO).
        k (`int`): distance to the nearest (k = 1) or mean over the k nearest bank entries.
        memory_bank_size (`int`): rows of the memory bank (the `memory_bank` buffer of the weights).
        search_dtype, search_projection_dim, num_candidates: approximate nearest-neighbour search (None: exact).
        query_stride (`int`): the patch grid is averaged over `query_stride` x `query_stride` cells before the
            search (the bank keeps every cell): `query_stride`^2 fewer searches for a coarser map. 1: every cell.
        search_num_lists, search_num_probes: inverted-file approximate search (see `NearestNeighborIndex`): the
            bank is split into `search_num_lists` k-means lists (seeded by `seed`, built when the model first
            scores) and each patch searches its `search_num_probes` nearest lists. None (default): exact. The
            ONNX export always searches exactly.
        coreset_fraction, seed, projection_dim: how the bank was reduced when it was fitted (kept for the record).
        image_mean, image_std: the normalisation of the inputs.
        image_threshold, pixel_threshold (`float`, *optional*): the calibrated decisions.
        tile_size, tile_overlap (`int`, *optional*): high-resolution inspection by tiles (pixels of the original
            image): each image is cut into overlapping `tile_size` tiles, each scored at `image_size`, and the maps
            stitched over the whole image (overlaps averaged); the image score comes from the stitched map. The
            settings the bank was fitted with (`cadmtl anomaly fit --tile-size`), the default of every scoring
            path (`AnomalyImageProcessor.predict`); None: the whole image at `image_size`.
        map_flips (`list[str]`, *optional*): test-time augmentation of the maps: each named flip of the input
            (`"h"` horizontal, `"v"` vertical, `"hv"` both) is scored too and its distance grid, flipped back, is
            averaged with the upright one into the anomaly map. The image score stays the upright view's (on
            magnetic tile the flips sharpen the maps but blur the image ranking, RESULTS.md); with tiles it comes
            from the stitched map, so from the averaged views. Each flip costs one more pass of the backbone and
            the search. None / []: the upright view only.
        neighbour_images (`int`, *optional*): a dense memory searched SPADE-style instead of the bank's nearest
            entries (`NearestImageMemory`): the bank holds every patch of every fitted image (float16, no coreset)
            with one descriptor per image (`image_descriptors`, the mean of its patches), and each query image is
            compared only with the patches of its `neighbour_images` nearest fitted images. None: the bank.
        memory_images (`int`): fitted images in a dense memory (rows of `image_descriptors`).
        border_profile (`list[float]`, *optional*): the image score is taken on the distance grid divided, ring
            by ring from its edge, by these factors (rings 0 .. R-1, then 1.0 for the interior): the mean normal
            distance of each ring over the interior's, fitted on held-out normal images when the scorer is fitted.
            A dense memory makes a grid's border stand out on normal images (its patches have fewer similar ones);
            the maps are not changed. None: the grid as it is.
        defect_head_hidden (`int`, *optional*): a small per-cell defect head on the same patch features (an MLP
            with this many hidden units, `PatchMemoryModel.defect_head`), trained on synthetic anomalies of the
            normal images (`cadmtl anomaly fit --defect-head`); its probability grid is fused with the distance
            grid. None: no head, the distances alone.
        defect_head_weight (`float`): the head's share of the fused map, `(1 - w) * z(distance) + w * z(head)`.
        defect_head_statistics (`list[float]`, *optional*): `[distance mean, distance std, head mean, head std]`
            of the two maps on held-out normal images, the `z` of the fusion (so the fused map is in standard
            deviations of normal pixels); None: unstandardised.
    """

    model_type = "cadmtl_patch_memory"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="dinov3_vit",
            init_kwargs={"num_register_tokens": 4, "pos_embed_rescale": None},
        ),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    backbone_class: str | None = None
    layers: list[int] | None = None
    aggregate: bool = True
    layer_norm: bool = True
    image_size: list[int] | None = None
    image_score: str = "top_mean"
    top_fraction: float = 0.01
    sigma: float = 4.0
    metric: str = "l2"
    k: int = 1
    memory_bank_size: int = 0
    search_dtype: str | None = None
    search_projection_dim: int | None = None
    num_candidates: int = 16
    query_stride: int = 1
    search_num_lists: int | None = None
    search_num_probes: int = 8
    coreset_fraction: float = 0.1
    seed: int = 0
    projection_dim: int | None = 128
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    tile_size: int | None = None
    tile_overlap: int = 0
    map_flips: list[str] | None = None
    neighbour_images: int | None = None
    memory_images: int = 0
    border_profile: list[float] | None = None
    defect_head_hidden: int | None = None
    defect_head_weight: float = 0.25
    defect_head_statistics: list[float] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_tile_settings(self.tile_size, self.tile_overlap)
        if self.backbone_config.model_type not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"Unsupported backbone model_type {self.backbone_config.model_type!r}; expected one of "
                f"{SUPPORTED_BACKBONES}."
            )
        if self.image_score not in IMAGE_SCORE_MODES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORE_MODES}; got {self.image_score!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}; got {self.metric!r}")
        check_ivf_arguments(self.search_num_lists, self.search_num_probes)
        if not isinstance(self.query_stride, int) or self.query_stride < 1:
            raise ValueError(f"query_stride must be a positive integer; got {self.query_stride!r}")
        self.map_flips = check_map_flips(self.map_flips)
        if self.neighbour_images is not None and (
            not isinstance(self.neighbour_images, int) or self.neighbour_images < 1
        ):
            raise ValueError(
                f"neighbour_images must be a positive integer or None; got {self.neighbour_images!r}"
            )
        if self.neighbour_images and (self.search_num_lists is not None or self.search_dtype is not None):
            raise ValueError(
                "search_num_lists / search_dtype search a coreset bank; a dense memory (neighbour_images) searches "
                "its nearest images' patches instead (search_projection_dim applies): set neighbour_images to None "
                "(--neighbour-images 0) or drop them"
            )
        if self.border_profile is not None:
            self.border_profile = [float(v) for v in self.border_profile]
            if not self.border_profile or not all(math.isfinite(v) and v > 0 for v in self.border_profile):
                raise ValueError(
                    f"border_profile must hold positive finite factors; got {self.border_profile}"
                )
        if self.defect_head_hidden is not None and (
            not isinstance(self.defect_head_hidden, int) or self.defect_head_hidden < 1
        ):
            raise ValueError(
                f"defect_head_hidden must be a positive integer or None; got {self.defect_head_hidden!r}"
            )
        if not 0.0 <= float(self.defect_head_weight) <= 1.0:
            raise ValueError(f"defect_head_weight must lie in [0, 1]; got {self.defect_head_weight!r}")
        self.defect_head_weight = float(self.defect_head_weight)
        if self.defect_head_statistics is not None:
            statistics = [float(v) for v in self.defect_head_statistics]
            if len(statistics) != 4 or not all(map(math.isfinite, statistics)) or min(statistics[1::2]) <= 0:
                raise ValueError(
                    "defect_head_statistics must be [distance mean, distance std, head mean, head std] with "
                    f"positive finite stds; got {self.defect_head_statistics}"
                )
            self.defect_head_statistics = statistics
        self.layers = [int(layer) for layer in self.layers] if self.layers is not None else None
        self.image_size = [int(v) for v in self.image_size] if self.image_size is not None else None
        self.image_mean = [float(v) for v in (self.image_mean or IMAGENET_MEAN)]
        self.image_std = [float(v) for v in (self.image_std or IMAGENET_STD)]


class AnomalyLearnerConfig(PreTrainedConfig):
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
        tile_size, tile_overlap: trained and scored on overlapping ``tile_size`` square tiles of the original
            images (pixels), each at ``image_size``, the maps stitched over the whole image (the processor's
            ``predict``); None: whole images resized to ``image_size``.
        teacher_backbone: the timm architecture of the frozen teacher whose features the ``distill`` task
            regresses (e.g. ``tf_efficientnet_lite0``; its weights are saved with the learner, so loading needs
            timm but no download); None without ``distill``.
        teacher_levels: the teacher's feature levels (timm ``out_indices``) the student matches; each level's
            stride must be one of :data:`TEACHER_STRIDES`.
        teacher_weights: the name of the pretrained weights the teacher was loaded with at training (cad-mtl's
            preset, e.g. ``efficientnet-lite0``); a record, inference uses the saved weights.
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
        tasks: Sequence[str] = DEFAULT_TASKS,
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
        tile_size: int | None = None,
        tile_overlap: int = 0,
        teacher_backbone: str | None = None,
        teacher_levels: Sequence[int] = (1, 2, 3),
        teacher_weights: str | None = None,
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
        check_tile_settings(tile_size, tile_overlap)
        self.tile_size = tile_size
        self.tile_overlap = int(tile_overlap or 0)
        if ("distill" in self.tasks) != (teacher_backbone is not None):
            raise ValueError(
                "the distill task and teacher_backbone go together: give both or neither; got tasks "
                f"{self.tasks} and teacher_backbone={teacher_backbone!r}"
            )
        self.teacher_backbone = teacher_backbone
        self.teacher_levels = sorted({int(level) for level in teacher_levels})
        if not self.teacher_levels or min(self.teacher_levels) < 0:
            raise ValueError(
                f"teacher_levels must be non-empty feature indices >= 0; got {list(teacher_levels)}"
            )
        self.teacher_weights = teacher_weights
        super().__init__(**kwargs)

    @property
    def grid(self) -> int:
        """Cells per side."""
        return self.image_size // self.cell_size


__all__ = ["AnomalyLearnerConfig", "PatchMemoryConfig", "check_task_weights"]


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
