"""Normal-only anomaly detection by patch memory (PatchCore / AnomalyDINO family) on DINOv3 patch features.

`fit` stores the patch features of normal images (optionally reduced by a greedy coreset); `score` gives each
query patch its distance to the nearest stored patch. The patch-grid distances are upsampled to the query size
and Gaussian-smoothed into the anomaly map; the image score is the maximum or the mean of the top 1 % of the
patch-grid distances (AnomalyDINO), so it does not depend on the query resolution.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.pipeline import IMAGENET_MEAN, IMAGENET_STD

# One threshold calibration serves every scorer; re-exported here for `cadmtl.anomaly` users.
from ..evaluation.metrics import calibrate_f1, calibrate_fpr  # noqa: F401
from ..features import PatchFeatureExtractor, backbone_depth, backbone_from_config, is_vit_config
from .memory_bank import NearestNeighborIndex, greedy_coreset

CONFIG_NAME = "config.json"
MEMORY_BANK_NAME = "memory_bank.safetensors"
BACKBONE_NAME = "backbone.safetensors"
IMAGE_SCORE_MODES = ("max", "top_mean")


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps, kernel radius 4 sigma, reflect padding (as anomalib)."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    x = maps[:, None]
    # Reflect padding needs pad < size; fall back to replicate on tiny maps.
    mode = "reflect" if min(maps.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, 0, 0), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def _iter_batches(images: Iterable[torch.Tensor] | torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    """Yield (B, 3, H, W) batches from single images (3, H, W) and/or batches (B, 3, H, W)."""
    pending: list[torch.Tensor] = []
    for item in images:
        item = torch.as_tensor(item)
        if item.ndim == 4:
            yield from (item[i : i + batch_size] for i in range(0, item.shape[0], batch_size))
            continue
        if item.ndim != 3:
            raise ValueError(
                f"expected images (3, H, W) or batches (B, 3, H, W); got shape {tuple(item.shape)}"
            )
        pending.append(item)
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


class PatchMemoryScorer(nn.Module):
    """Patch-memory anomaly scorer.

    Args:
        backbone: a DINOv3 ViT / ConvNeXt model (or one with the same `hidden_states` API).
        layers: backbone layers whose patch features are concatenated (1-based, see `cadmtl.features`);
            None: the middle two of four quarters, (depth // 2, 3 * depth // 4), e.g. (6, 9) for ViT-S/B.
        coreset_fraction: fraction of the fitted patches kept by the greedy coreset (1.0 keeps all).
        image_size: (H, W) the bank is fitted at; images of another size are resized (bilinear) to it before
            feature extraction, and their maps are returned at their own size. None: the first fitted image's.
        image_score: "max" or "top_mean" (mean of the top `top_fraction` of the patch distances).
        sigma: Gaussian smoothing of the maps, in pixels of the query image.
        metric: "l2" (PatchCore) or "cosine" (AnomalyDINO) patch distance.
        image_mean, image_std: the normalisation the inputs are expected to carry (stored for export).
        search_dtype, search_projection_dim, num_candidates: approximate nearest-neighbour search (see
            `NearestNeighborIndex`), e.g. "bfloat16" and 128; None (default) searches exactly in float32.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layers: Sequence[int] | None = None,
        coreset_fraction: float = 0.1,
        image_size: tuple[int, int] | None = (224, 224),
        image_score: str = "top_mean",
        top_fraction: float = 0.01,
        sigma: float = 4.0,
        metric: str = "l2",
        aggregate: bool = True,
        layer_norm: bool = True,
        k: int = 1,
        seed: int = 0,
        projection_dim: int | None = 128,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        search_dtype: str | None = None,
        search_projection_dim: int | None = None,
        num_candidates: int = 16,
    ):
        super().__init__()
        if image_score not in IMAGE_SCORE_MODES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORE_MODES}; got {image_score!r}")
        if layers is None:
            depth = backbone_depth(backbone.config)
            layers = sorted({max(1, depth // 2), max(1, 3 * depth // 4)})
        self.extractor = PatchFeatureExtractor(backbone, layers, aggregate=aggregate, layer_norm=layer_norm)
        self.coreset_fraction = coreset_fraction
        self.image_size = tuple(image_size) if image_size is not None else None
        self.image_score = image_score
        self.top_fraction = top_fraction
        self.sigma = sigma
        self.metric = metric
        self.k = k
        self.seed = seed
        self.projection_dim = projection_dim
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.image_threshold = image_threshold
        self.pixel_threshold = pixel_threshold
        self.search_dtype = search_dtype
        self.search_projection_dim = search_projection_dim
        self.num_candidates = num_candidates
        self._index: NearestNeighborIndex | None = None
        self._index_bank: torch.Tensor | None = None
        self.register_buffer("memory_bank", torch.zeros(0, self.extractor.num_channels), persistent=False)
        self.eval()

    @property
    def backbone(self) -> nn.Module:
        return self.extractor.backbone

    @property
    def layers(self) -> list[int]:
        return self.extractor.layers

    def _resize_to_fit_size(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.image_size is None:
            self.image_size = tuple(pixel_values.shape[-2:])
        if tuple(pixel_values.shape[-2:]) != self.image_size:
            pixel_values = F.interpolate(
                pixel_values, size=self.image_size, mode="bilinear", align_corners=False
            )
        return pixel_values

    @torch.no_grad()
    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C, h, w) features at the fit size."""
        pixel_values = self._resize_to_fit_size(pixel_values.float())
        if is_vit_config(self.extractor.config):
            patch = self.extractor.config.patch_size
            if self.image_size[0] % patch or self.image_size[1] % patch:
                raise ValueError(f"image size {self.image_size} must be a multiple of the patch size {patch}")
        param = next(self.backbone.parameters())
        return self.extractor(pixel_values.to(device=param.device, dtype=param.dtype)).float()

    @torch.no_grad()
    def fit(
        self,
        images: Iterable[torch.Tensor] | torch.Tensor,
        batch_size: int = 8,
        few_shot: bool = False,
    ) -> PatchMemoryScorer:
        """Build the memory bank from normal images: an iterable of (3, H, W) tensors and/or (B, 3, H, W)
        batches, already normalised. `few_shot=True` keeps every patch of the k reference images (no coreset)."""
        features = []
        for batch in _iter_batches(images, batch_size):
            maps = self.patch_features(batch)  # (B, C, h, w)
            features.append(maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]).cpu())
        if not features:
            raise ValueError("fit needs at least one normal image")
        bank = torch.cat(features)
        if not few_shot and self.coreset_fraction < 1.0:
            bank = bank[greedy_coreset(bank, self.coreset_fraction, self.seed, self.projection_dim)]
        self.memory_bank = bank.to(self.memory_bank.device).contiguous()
        return self

    def index(self) -> NearestNeighborIndex:
        """The search index of the current memory bank, built once per bank (rebuilt after fit / reassignment)."""
        if self.memory_bank.shape[0] == 0:
            raise ValueError("the memory bank is empty: call fit() (or from_pretrained) before score()")
        if self._index is None or self._index_bank is not self.memory_bank:
            dtype = getattr(torch, self.search_dtype) if self.search_dtype else None
            self._index = NearestNeighborIndex(
                self.memory_bank,
                self.metric,
                dtype,
                self.search_projection_dim,
                self.num_candidates,
                self.seed,
            )
            self._index_bank = self.memory_bank
        return self._index

    def _image_scores(self, distances: torch.Tensor) -> torch.Tensor:
        """(B, h, w) patch distances -> (B,) image scores."""
        flat = distances.flatten(1)
        if self.image_score == "max":
            return flat.max(dim=1).values
        count = max(1, math.ceil(self.top_fraction * flat.shape[1]))
        return flat.topk(count, dim=1).values.mean(dim=1)

    @torch.no_grad()
    def score(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalised images -> (maps (B, H, W) at the input size, image scores (B,))."""
        index = self.index()
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        height, width = pixel_values.shape[-2:]
        features = self.patch_features(pixel_values)  # (B, C, h, w)
        batch, channels, grid_h, grid_w = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(-1, channels)
        distances = index.search(queries, self.k).view(batch, grid_h, grid_w)
        maps = F.interpolate(distances[:, None], size=(height, width), mode="bilinear", align_corners=False)[
            :, 0
        ]
        return gaussian_blur(maps, self.sigma), self._image_scores(distances)

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """`score` plus the calibrated decisions: {"anomaly_maps" (B, H, W), "image_scores" (B,),
        "is_anomalous" (B,) bool or None, "defect_masks" (B, H, W) bool or None}; a decision is None until its
        threshold is set (anomalous: value >= threshold)."""
        maps, scores = self.score(pixel_values)
        return {
            "anomaly_maps": maps,
            "image_scores": scores,
            "is_anomalous": None if self.image_threshold is None else scores >= self.image_threshold,
            "defect_masks": None if self.pixel_threshold is None else maps >= self.pixel_threshold,
        }

    # ------------------------------------------------------------------------------------------------------
    # Serialisation
    # ------------------------------------------------------------------------------------------------------

    def to_config(self) -> dict:
        backbone_config = self.extractor.config.to_dict()
        return {
            "layers": self.layers,
            "coreset_fraction": self.coreset_fraction,
            "image_size": list(self.image_size) if self.image_size is not None else None,
            "image_score": self.image_score,
            "top_fraction": self.top_fraction,
            "sigma": self.sigma,
            "metric": self.metric,
            "aggregate": self.extractor.aggregate,
            "layer_norm": self.extractor.layer_norm,
            "k": self.k,
            "seed": self.seed,
            "projection_dim": self.projection_dim,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "image_threshold": self.image_threshold,
            "pixel_threshold": self.pixel_threshold,
            "search_dtype": self.search_dtype,
            "search_projection_dim": self.search_projection_dim,
            "num_candidates": self.num_candidates,
            "memory_bank_size": int(self.memory_bank.shape[0]),
            "backbone_class": type(self.backbone).__name__,
            "backbone_config": backbone_config,
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config.json, memory_bank.safetensors and backbone.safetensors to `save_directory`."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.to_config(), indent=2, sort_keys=True) + "\n")
        save_file({"memory_bank": self.memory_bank.detach().cpu().contiguous()}, directory / MEMORY_BANK_NAME)
        state = {name: t.detach().cpu().contiguous() for name, t in self.backbone.state_dict().items()}
        save_file(state, directory / BACKBONE_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> PatchMemoryScorer:
        """Restore a scorer written by `save_pretrained` (backbone, bank, settings and thresholds)."""
        directory = Path(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        backbone_config = dict(config.pop("backbone_config"))
        backbone_class = config.pop("backbone_class")
        config.pop("memory_bank_size")
        model_type = backbone_config.pop("model_type")
        backbone_config = transformers.AutoConfig.for_model(model_type, **backbone_config)
        model_class = getattr(transformers, backbone_class, None)
        backbone = (
            model_class(backbone_config) if model_class is not None else backbone_from_config(backbone_config)
        )
        backbone.load_state_dict(load_file(directory / BACKBONE_NAME), strict=True)
        backbone.eval()
        scorer = cls(backbone, **config)
        scorer.memory_bank = load_file(directory / MEMORY_BANK_NAME)["memory_bank"]
        return scorer
