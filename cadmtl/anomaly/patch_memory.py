"""Normal-only anomaly detection by patch memory (PatchCore / AnomalyDINO family) on DINOv3 patch features.

`PatchMemoryScorer` is the Hub model `modeling_cadmtl_anomaly.PatchMemoryModel` plus fitting: `from_backbone`
wraps a backbone with the chosen settings and `fit` stores the patch features of normal images (optionally reduced
by a greedy coreset) as the memory bank. Scoring (`score`, `predict`, `forward`) and saving are the Hub model's:
each query patch's distance to its nearest stored patch, upsampled to the query size and Gaussian-smoothed into the
anomaly map; the image score is the maximum or the mean of the top 1 % of the patch-grid distances (AnomalyDINO).
A saved scorer (`save_pretrained`) loads with `AutoModel.from_pretrained(DIR, trust_remote_code=True)` and no
cad-mtl installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from modeling_cadmtl_anomaly import PatchMemoryConfig, PatchMemoryModel
from modeling_cadmtl_anomaly.configuration_cadmtl_anomaly import backbone_normalization
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import border_profile, gaussian_blur

# One threshold calibration serves every scorer; re-exported here for `cadmtl.anomaly` users.
from ..evaluation.metrics import calibrate_f1, calibrate_fpr
from ..features import is_vit_config
from .memory_bank import greedy_coreset

__all__ = [
    "PRETRAINED_DEFAULTS",
    "RANDOM_INIT_DEFAULTS",
    "PatchMemoryScorer",
    "calibrate_f1",
    "calibrate_fpr",
    "gaussian_blur",
]

# `cadmtl anomaly fit`'s settings per kind of backbone. The EfficientNet-Lite ones were chosen by a small sweep on
# the magnetic-tile validation split (benchmarks/sweep_pretrained_anomaly.py, RESULTS.md): 384 px and the stride-32
# level lift image AUROC (84.3 at 256 px / levels 2+3 -> 88.3), top_mean beats max (88.3 vs 83.4), a 5 % coreset
# adds 0.5 pixel AUROC over 1 % for 5x the fit time; sigma 2 / 4 / 8 tie within 0.3. Layers are timm feature
# levels (2 = stride 8, 3 = stride 16, 4 = stride 32).
PRETRAINED_DEFAULTS = {
    "layers": [2, 3, 4],
    "image_size": 384,
    "coreset_fraction": 0.01,
    "sigma": 4.0,
    "k": 1,
    "image_score": "top_mean",
    "aggregate": True,
    # nearest-neighbour candidates on a 64-dim projection, 16 re-ranked exactly: the exact search's tile metrics
    # (Lite2 384 px, validation 96.3 / 92.8 / 88.3 vs 96.3 / 93.0 / 88.4) at 2x onnxruntime speed (RESULTS.md)
    "search_projection_dim": 64,
    # the maps averaged over the three flips of the input (the image score stays the upright view's): validation
    # pixel AUROC 92.8 -> 95.8 (h alone: 95.0), AUPRO 88.3 -> 88.1, image AUROC unchanged, for 4x the scoring
    # time (RESULTS.md, session 7)
    "map_flips": ["h", "v", "hv"],
    # a dense memory of every train patch, each image compared with its 20 nearest train images, the image score on
    # a border profile: tile test image AUROC 95.3 -> 97.0 (crack 86.2 -> 93.6); validation 96.3 -> 96.8 (K 40:
    # 96.9 for twice the search; RESULTS.md, session 9)
    "neighbour_images": 20,
}
# Rings of grid cells from the edge that a dense memory's border profile evens out (the interior is the rest):
# normal distances on the tiles fall from 1.43x the interior's on the outermost ring to 1.12x on the fifth.
BORDER_RINGS = 5
RANDOM_INIT_DEFAULTS = {
    "layers": None,  # the backbone's default_layers
    "image_size": 224,
    "coreset_fraction": 0.1,
    "sigma": 4.0,
    "k": 1,
    "image_score": "top_mean",
    "aggregate": True,
    "search_projection_dim": None,  # exact
    "map_flips": None,  # the upright view only
    "neighbour_images": None,  # the coreset bank
}


def iter_batches(images: Iterable[torch.Tensor] | torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
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


class PatchMemoryScorer(PatchMemoryModel):
    """The Hub patch-memory model plus fitting (see the module docstring); build one with `from_backbone`."""

    @classmethod
    def from_backbone(
        cls,
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
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        search_dtype: str | None = None,
        search_projection_dim: int | None = None,
        num_candidates: int = 16,
        search_num_lists: int | None = None,
        search_num_probes: int = 8,
        query_stride: int = 1,
        map_flips: Sequence[str] | None = None,
        neighbour_images: int | None = None,
    ) -> PatchMemoryScorer:
        """A scorer with an empty memory bank on `backbone` (a DINOv3 ViT / ConvNeXt model or backbone, or a
        transformers `TimmBackbone` such as `cadmtl.pretrained.pretrained_backbone("efficientnet-lite0")`).

        Args:
            layers: backbone layers whose patch features are concatenated (1-based, see `cadmtl.features`);
                None: the middle two of four quarters, (depth // 2, 3 * depth // 4), e.g. (6, 9) for ViT-S/B.
            coreset_fraction: fraction of the fitted patches kept by the greedy coreset (1.0 keeps all).
            image_size: (H, W) the bank is fitted at; images of another size are resized (bilinear) to it before
                feature extraction, and their maps are returned at their own size. None: the first fitted image's.
            image_score: "max" or "top_mean" (mean of the top `top_fraction` of the patch distances).
            sigma: Gaussian smoothing of the maps, in pixels of the query image.
            metric: "l2" (PatchCore) or "cosine" (AnomalyDINO) patch distance.
            image_mean, image_std: the normalisation the inputs are expected to carry (saved with the processor);
                None: what the backbone's weights expect (ImageNet's, or [-1, 1] for the EfficientNet-Lite ones).
            search_dtype, search_projection_dim, num_candidates: approximate nearest-neighbour search (see
                `NearestNeighborIndex`), e.g. "bfloat16" and 128; None (default) searches exactly in float32.
            search_num_lists, search_num_probes: inverted-file approximate search (k-means lists, seeded by
                `seed`; ~sqrt(bank size) lists); None (default) searches exactly.
            query_stride: score the patch grid averaged over `query_stride` x `query_stride` cells (the bank
                keeps every cell): `query_stride`^2 fewer searches, a coarser map; 1 (default): every cell.
            map_flips: flipped views ("h", "v", "hv") whose distance grids, flipped back, are averaged with the
                upright one into the maps (the image score stays the upright view's); None: the upright view only.
            neighbour_images: a dense memory (every fitted patch, float16, no coreset) whose K nearest images by
                their mean feature each query is compared with (`NearestImageMemory`); None: the coreset bank.
        """
        default_mean, default_std = backbone_normalization(backbone.config)
        config = PatchMemoryConfig(
            backbone_config=backbone.config,
            backbone_class=type(backbone).__name__,
            layers=list(layers) if layers is not None else None,
            aggregate=aggregate,
            layer_norm=layer_norm,
            image_size=list(image_size) if image_size is not None else None,
            image_score=image_score,
            top_fraction=top_fraction,
            sigma=sigma,
            metric=metric,
            k=k,
            search_dtype=search_dtype,
            search_projection_dim=search_projection_dim,
            num_candidates=num_candidates,
            search_num_lists=search_num_lists,
            search_num_probes=search_num_probes,
            query_stride=query_stride,
            map_flips=list(map_flips) if map_flips else None,
            neighbour_images=neighbour_images or None,
            coreset_fraction=1.0 if neighbour_images else coreset_fraction,
            seed=seed,
            projection_dim=projection_dim,
            image_mean=list(image_mean if image_mean is not None else default_mean),
            image_std=list(image_std if image_std is not None else default_std),
            image_threshold=image_threshold,
            pixel_threshold=pixel_threshold,
        )
        scorer = cls(config, backbone=backbone.eval())
        if is_vit_config(backbone.config):
            # The attention `from_pretrained` picks for the saved scorer: fitting and serving compute alike.
            scorer.set_attn_implementation("sdpa")
        return scorer

    @property
    def coreset_fraction(self) -> float:
        return self.config.coreset_fraction

    @torch.no_grad()
    def fit(
        self,
        images: Iterable[torch.Tensor] | torch.Tensor,
        batch_size: int = 8,
        few_shot: bool = False,
    ) -> PatchMemoryScorer:
        """Build the memory bank from normal images: an iterable of (3, H, W) tensors and/or (B, 3, H, W)
        batches, already normalised. `few_shot=True` keeps every patch of the k reference images (no coreset)."""
        config = self.config
        dense = bool(config.neighbour_images)
        features, descriptors = [], []
        for batch in iter_batches(images, batch_size):
            maps = self.patch_features(batch)  # (B, C, h, w)
            patches = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]).cpu()
            if dense:  # float16 patches, and each image's descriptor to retrieve them by
                patches = patches.half()
                descriptors.append(maps.mean(dim=(2, 3)).cpu())
            features.append(patches)
        if not features:
            raise ValueError("fit needs at least one normal image")
        bank = torch.cat(features)
        if dense:  # every patch of every image, found through the image descriptors (no coreset)
            self.set_memory_bank(bank, torch.cat(descriptors))
            return self
        if not few_shot and config.coreset_fraction < 1.0:
            bank = bank[
                greedy_coreset(
                    bank, config.coreset_fraction, config.seed, config.projection_dim, progress=True
                )
            ]
        self.set_memory_bank(bank)
        return self

    @torch.no_grad()
    def fit_border_profile(
        self, images: Iterable[torch.Tensor] | torch.Tensor, batch_size: int = 8, rings: int = BORDER_RINGS
    ) -> list[float] | None:
        """Fit `config.border_profile` on held-out normal images (never the fitted ones: each would find itself in
        the memory at distance 0): their upright distance grids' mean per ring of cells over the interior's. Grids
        too small for an interior leave it None. Returns the profile."""
        self.config.border_profile = None
        grids = [self.distance_grid(batch).cpu() for batch in iter_batches(images, batch_size)]
        if grids:
            self.config.border_profile = border_profile(torch.cat(grids), rings)
        return self.config.border_profile

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any
    ) -> Any:
        """A saved scorer in eval mode; with `output_loading_info=True`, `(scorer, loading_info)`."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if isinstance(loaded, tuple):
            return (loaded[0].eval(), *loaded[1:])
        return loaded.eval()
