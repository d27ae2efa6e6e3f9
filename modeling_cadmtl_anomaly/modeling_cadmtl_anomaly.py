"""The patch-memory anomaly scorer (PatchCore / AnomalyDINO family) as a transformers model, and the Hub plumbing
shared with the from-scratch learner (`learner_cadmtl_anomaly.py`).

`PatchMemoryModel(pixel_values)`: patch features of the chosen DINOv3 layers (class and register tokens dropped,
3x3 neighbourhood aggregation) -> distance of each patch to its nearest entry of the memory bank (a buffer of the
weights, searched in memory-bounded chunks) -> bilinear upsampling to the input size -> Gaussian smoothing = the
anomaly map; the image score is the maximum or the mean of the top 1 % of the patch distances, so it does not
depend on the input resolution. Maps are never normalised per image: a normal image keeps low values.

With `neighbour_images` set the bank is a dense memory instead (SPADE-style): every patch of every fitted image in
float16, each query image searched only among the patches of its nearest fitted images by mean feature
(`NearestImageMemory`), and the image score taken on the grid divided by a `border_profile` (normal distances per
ring of cells from the edge, fitted on held-out normals), since a dense memory makes a grid's border stand out.

With `defect_head_hidden` set, a small per-cell MLP (`DefectHead`, trained by cad-mtl on synthetic anomalies of the
normal images) also reads the same features, and the map is `(1 - w) * z(distance) + w * z(head probability)`, each
standardised by its mean and std on held-out normal pixels (`defect_head_statistics`), averaged over the flips like
the distances; the image score is taken on the fused upright grid.

Fitting the bank (greedy coreset selection of normal patches) is done by `cadmtl anomaly fit`; this file only
scores, so a saved scorer runs with torch + transformers alone:

```python
>>> from transformers import AutoImageProcessor, AutoModel
>>> model = AutoModel.from_pretrained("outputs/ad-demo/model", trust_remote_code=True)
>>> processor = AutoImageProcessor.from_pretrained("outputs/ad-demo/model", trust_remote_code=True)
>>> outputs = model(**processor(images, return_tensors="pt"))
>>> results = processor.post_process_anomaly_maps(outputs, target_sizes=[(h, w)], **model.thresholds)
```
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_cadmtl_anomaly import MAP_FLIPS, TIMM_INSTALL_HINT, PatchMemoryConfig
from .features_cadmtl_anomaly import (
    NearestImageMemory,
    NearestNeighborIndex,
    PatchFeatureExtractor,
    backbone_depth,
    image_scores,
    is_timm_config,
    is_vit_config,
    random_projection_matrix,
    ring_scale,
    upsample_blur,
)

# Written into config.json so AutoConfig / AutoModel resolve to the classes in the repo's flat code files.
PATCH_MEMORY_AUTO_MAP = {
    "AutoConfig": "configuration_cadmtl_anomaly.PatchMemoryConfig",
    "AutoModel": "modeling_cadmtl_anomaly.PatchMemoryModel",
}
PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "image_processing_cadmtl_anomaly.AnomalyImageProcessor"}


@dataclass
class AnomalyOutput(ModelOutput):
    """Output of the anomaly models (maps at the input size; higher = more anomalous).

    Args:
        anomaly_maps `(B, H, W)`: the anomaly map of each image.
        image_scores `(B,)`: the image-level anomaly score.
        is_anomalous `(B,)` bool, defect_masks `(B, H, W)` bool: the calibrated decisions (value >= threshold),
            None until the config holds `image_threshold` / `pixel_threshold`.
        task_maps, raw_task_maps: the learner's standardised and raw per-task maps `{task: (B, H, W)}`.
    """

    anomaly_maps: torch.FloatTensor | None = None
    image_scores: torch.FloatTensor | None = None
    is_anomalous: torch.BoolTensor | None = None
    defect_masks: torch.BoolTensor | None = None
    task_maps: dict[str, torch.FloatTensor] | None = None
    raw_task_maps: dict[str, torch.FloatTensor] | None = None


def default_layers(config: Any) -> list[int]:
    """Half and three quarters of the backbone depth: mid-level, local features, e.g. (6, 9) for ViT-S/B; the
    first two feature levels of a timm backbone (strides 8 and 16 for EfficientNet)."""
    if is_timm_config(config):
        return sorted(config.out_indices)[:2]
    depth = backbone_depth(config)
    return sorted({max(1, depth // 2), max(1, 3 * depth // 4)})


def build_backbone(config: PatchMemoryConfig) -> nn.Module:
    """A randomly initialised backbone of `config.backbone_class` (a transformers class name; else AutoModel)."""
    if is_timm_config(config.backbone_config):
        from transformers.utils import is_timm_available

        if not is_timm_available():
            raise ImportError(
                f"This scorer's backbone is the timm network {config.backbone_config.backbone!r}: {TIMM_INSTALL_HINT}"
            )
    model_class = getattr(transformers, config.backbone_class, None) if config.backbone_class else None
    if model_class is not None:
        return model_class(config.backbone_config)
    return AutoModel.from_config(config.backbone_config)


class AnomalyPreTrainedModel(PreTrainedModel):
    """Shared Hub behaviour of the anomaly models: `save_pretrained` also writes the processor and this package's
    flat code files with `auto_map` in config.json, so `AutoModel.from_pretrained(repo, trust_remote_code=True)`
    needs neither cad-mtl nor its training dependencies."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True
    auto_map: dict[str, str] = {}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Layers keep PyTorch's default initialisation (the backbone its own); saved weights replace everything.
        pass

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) the model scores at; inputs of another size are resized to it."""
        raise NotImplementedError

    @property
    def thresholds(self) -> dict[str, float | None]:
        """The calibrated `image_threshold` and `pixel_threshold` (keyword arguments of
        `AnomalyImageProcessor.post_process_anomaly_maps`)."""
        return {
            "image_threshold": self.config.image_threshold,
            "pixel_threshold": self.config.pixel_threshold,
        }

    @property
    def image_threshold(self) -> float | None:
        return self.config.image_threshold

    @image_threshold.setter
    def image_threshold(self, value: float | None) -> None:
        self.config.image_threshold = None if value is None else float(value)

    @property
    def pixel_threshold(self) -> float | None:
        return self.config.pixel_threshold

    @pixel_threshold.setter
    def pixel_threshold(self, value: float | None) -> None:
        self.config.pixel_threshold = None if value is None else float(value)

    @property
    def image_mean(self) -> list[float]:
        return list(self.config.image_mean)

    @property
    def image_std(self) -> list[float]:
        return list(self.config.image_std)

    def _decisions(self, maps: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor | None]:
        image_threshold, pixel_threshold = self.config.image_threshold, self.config.pixel_threshold
        return {
            "is_anomalous": None if image_threshold is None else scores >= image_threshold,
            "defect_masks": None if pixel_threshold is None else maps >= pixel_threshold,
        }

    @torch.no_grad()
    def score(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalised images -> (maps (B, H, W) at the input size, image scores (B,)), float32 CPU."""
        outputs = self.predict(pixel_values)
        return outputs.anomaly_maps.float().cpu(), outputs.image_scores.float().cpu()

    def predict(self, pixel_values: torch.Tensor) -> AnomalyOutput:
        raise NotImplementedError

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args: Any, image_processor: Any | None = None, **kwargs: Any
    ) -> None:
        """`PreTrainedModel.save_pretrained` (config.json, model.safetensors) plus the image processor
        (`image_processor`, else one built from the config) and the flat code files of this package."""
        self.config.auto_map = dict(self.auto_map)
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        # A subclass (cad-mtl's fitting / training classes) saves as the Hub class it extends.
        self.config.architectures = [self.auto_map["AutoModel"].split(".")[-1]]
        self.config.save_pretrained(save_directory)
        from .image_processing_cadmtl_anomaly import AnomalyImageProcessor

        if image_processor is None:
            image_processor = AnomalyImageProcessor.from_model_config(self.config)
        image_processor.save_pretrained(save_directory)
        here = Path(__file__).resolve().parent
        for code in sorted(here.glob("*.py")):
            if code.name != "__init__.py":
                shutil.copyfile(code, Path(save_directory) / code.name)


class DefectHead(nn.Module):
    """A per-cell defect classifier on the scorer's patch features: (B, C, h, w) -> probabilities (B, h, w).

    Standardised inputs (`input_mean` / `input_std`, buffers fitted with the head) -> Linear(C, hidden) -> GELU ->
    Linear(hidden, 1) -> sigmoid. Trained by cad-mtl on synthetic anomalies of normal images; it sees only the
    features the memory is searched with, so it adds no backbone pass."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(channels))
        self.register_buffer("input_std", torch.ones(channels))
        self.hidden = nn.Linear(channels, hidden)
        self.output = nn.Linear(hidden, 1)

    def logits(self, cells: torch.Tensor) -> torch.Tensor:
        """(..., C) patch features -> (...) logits."""
        cells = (cells - self.input_mean) / self.input_std
        return self.output(F.gelu(self.hidden(cells)))[..., 0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(features.permute(0, 2, 3, 1)))


class PatchMemoryModel(AnomalyPreTrainedModel):
    """Patch-memory anomaly scorer: `forward(pixel_values)` -> `AnomalyOutput` (see the module docstring).

    `backbone`: an already built backbone module to use instead of a fresh one from the config (how cad-mtl wraps
    a pretrained DINOv3 or CadMtl backbone before fitting).
    """

    config: PatchMemoryConfig
    config_class = PatchMemoryConfig
    base_model_prefix = "patch_memory"
    auto_map = PATCH_MEMORY_AUTO_MAP

    def __init__(self, config: PatchMemoryConfig, backbone: nn.Module | None = None):
        super().__init__(config)
        backbone = backbone if backbone is not None else build_backbone(config)
        if config.layers is None:
            config.layers = default_layers(backbone.config)
        self.extractor = PatchFeatureExtractor(backbone, config.layers, config.aggregate, config.layer_norm)
        channels = self.extractor.num_channels
        # A dense memory keeps every fitted patch, so it is stored in float16 (searched in float32).
        bank_dtype = torch.float16 if config.neighbour_images else torch.float32
        self.register_buffer("memory_bank", torch.zeros(config.memory_bank_size, channels, dtype=bank_dtype))
        if config.neighbour_images:
            self.register_buffer("image_descriptors", torch.zeros(config.memory_images, channels))
        self.defect_head = (
            DefectHead(channels, config.defect_head_hidden) if config.defect_head_hidden else None
        )
        self._index: NearestNeighborIndex | NearestImageMemory | None = None
        self._index_bank: torch.Tensor | None = None
        self._export_index: NearestNeighborIndex | NearestImageMemory | None = None
        self.post_init()
        self.eval()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> PatchMemoryModel:
        """`.to()`, `.float()`, `.half()`, `.cuda()`: a dense memory moves to the new device but stays float16
        (a `.float()` would otherwise copy the GBs of a dense memory into float32, twice the size)."""
        if not self.config.neighbour_images or self.memory_bank.dtype != torch.float16:
            return super()._apply(fn, recurse)
        bank = self.memory_bank
        # the cast applies to an empty placeholder, whose new device the memory then moves to
        self._buffers["memory_bank"] = bank[:0]
        try:
            super()._apply(fn, recurse)
        finally:
            device = self._buffers["memory_bank"].device
            self._buffers["memory_bank"] = bank.to(device)
        return self

    @property
    def backbone(self) -> nn.Module:
        return self.extractor.backbone

    @property
    def layers(self) -> list[int]:
        return self.extractor.layers

    @property
    def image_size(self) -> tuple[int, int] | None:
        return tuple(self.config.image_size) if self.config.image_size is not None else None

    def _resize_to_fit_size(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.config.image_size is None:
            self.config.image_size = list(pixel_values.shape[-2:])
        if tuple(pixel_values.shape[-2:]) != self.image_size:
            pixel_values = F.interpolate(
                pixel_values, size=self.image_size, mode="bilinear", align_corners=False
            )
        return pixel_values

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C, h, w) features at the fit size."""
        pixel_values = self._resize_to_fit_size(pixel_values.float())
        if is_vit_config(self.extractor.config):
            patch = self.extractor.config.patch_size
            if self.image_size[0] % patch or self.image_size[1] % patch:
                raise ValueError(f"image size {self.image_size} must be a multiple of the patch size {patch}")
        param = next(self.backbone.parameters())
        return self.extractor(pixel_values.to(device=param.device, dtype=param.dtype)).float()

    def index(self) -> NearestNeighborIndex | NearestImageMemory:
        """The search index of the current memory bank, built once per bank (rebuilt after a new bank; the
        inverted file's k-means runs here, seeded), or a `NearestImageMemory` for a dense memory. While exporting,
        the one `export_index` built (built here if it was not): exact float32, or the float32 projected search with
        exact re-ranking (`search_projection_dim`); a reduced `search_dtype` and the inverted file are not
        exported."""
        if self.memory_bank.shape[0] == 0:
            raise ValueError("the memory bank is empty: fit the scorer (cadmtl anomaly fit) before scoring")
        config = self.config
        if torch.compiler.is_exporting():
            return self._export_index if self._export_index is not None else self.export_index()
        if self._index is None or self._index_bank is not self.memory_bank:
            if config.neighbour_images:
                self._index = self._image_memory()
                self._index_bank = self.memory_bank
                return self._index
            dtype = getattr(torch, config.search_dtype) if config.search_dtype else None
            self._index = NearestNeighborIndex(
                self.memory_bank,
                config.metric,
                dtype,
                config.search_projection_dim,
                config.num_candidates,
                config.seed,
                num_lists=config.search_num_lists,
                num_probes=config.search_num_probes,
            )
            self._index_bank = self.memory_bank
        return self._index

    def _image_memory(self) -> NearestImageMemory:
        """The dense memory's search: exact, or on the seeded `search_projection_dim` projection with
        `num_candidates` re-ranked exactly."""
        config = self.config
        channels = self.extractor.num_channels
        projection_dim = config.search_projection_dim
        projection = (
            random_projection_matrix(channels, projection_dim, config.seed).to(self.memory_bank.device)
            if projection_dim and projection_dim < channels
            else None
        )
        return NearestImageMemory(
            self.memory_bank.view(config.memory_images, -1, channels),
            self.image_descriptors,
            config.neighbour_images,
            config.metric,
            projection,
            config.num_candidates,
        )

    def export_index(self) -> NearestNeighborIndex | NearestImageMemory:
        """The index an exported graph searches with, built before tracing (its projection matrix is a seeded
        random draw, which a graph cannot hold) and kept for the export: float32, projected to
        `search_projection_dim` dims with `num_candidates` re-ranked exactly when that is set, else exact."""
        config = self.config
        if config.neighbour_images:
            self._export_index = self._image_memory()
            return self._export_index
        self._export_index = NearestNeighborIndex(
            self.memory_bank,
            config.metric,
            projection_dim=config.search_projection_dim,
            num_candidates=config.num_candidates,
            seed=config.seed,
        )
        return self._export_index

    def set_memory_bank(self, bank: torch.Tensor, image_descriptors: torch.Tensor | None = None) -> None:
        """Replace the memory bank (M, C) of normal patch features (the search index is rebuilt). A dense memory
        (`neighbour_images`) also takes the (N, C) descriptors of its N images, whose patches are the bank's rows
        in order (M = N * patches per image)."""
        channels = self.extractor.num_channels
        if bank.ndim != 2 or bank.shape[1] != channels:
            raise ValueError(f"a memory bank must be (entries, {channels}); got {tuple(bank.shape)}")
        if self.config.neighbour_images:
            if (
                image_descriptors is None
                or image_descriptors.shape[-1] != channels
                or image_descriptors.ndim != 2
            ):
                raise ValueError(f"a dense memory needs image descriptors (images, {channels}) with its bank")
            count = image_descriptors.shape[0]
            if count == 0 or bank.shape[0] % count:
                raise ValueError(
                    f"a dense memory of {count} images cannot hold {bank.shape[0]} patches (not a multiple)"
                )
            self.image_descriptors = image_descriptors.to(self.memory_bank.device, torch.float32).contiguous()
            self.config.memory_images = int(count)
        self.memory_bank = bank.to(self.memory_bank.device, self.memory_bank.dtype).contiguous()
        self.config.memory_bank_size = int(bank.shape[0])
        self._export_index = None  # drawn again for the new bank by the next export

    def distance_grid(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, h, w) distances of their patches to the nearest normal ones."""
        return self.distances_of(self.patch_features(pixel_values))

    def distances_of(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) patch features -> (B, h', w') distances to the nearest normal patches (h' = h without a
        `query_stride`)."""
        descriptors = features.mean(dim=(2, 3))  # (B, C): what a dense memory retrieves its images by
        # Neighbouring cells share most of their context: search their average, (B, C, ceil(h / s), ceil(w / s)).
        features = self._query_pool(features)
        batch, channels, grid_h, grid_w = features.shape
        if self.config.neighbour_images:
            queries = features.permute(0, 2, 3, 1).reshape(batch, grid_h * grid_w, channels)
            return self.index().search(queries, descriptors, self.config.k).view(batch, grid_h, grid_w)
        queries = features.permute(0, 2, 3, 1).reshape(-1, channels)
        return self.index().search(queries, self.config.k).view(batch, grid_h, grid_w)

    def _query_pool(self, grid: torch.Tensor) -> torch.Tensor:
        stride = self.config.query_stride
        return F.avg_pool2d(grid, stride, ceil_mode=True) if stride > 1 else grid

    def component_grids(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unfused grids of (B, 3, H, W) images, each averaged over the upright and flipped views:
        `{"distance": (B, h, w)}`, plus `{"defect_head": (B, h, w)}` probabilities with a defect head, and the
        upright views alone under `"upright_distance"` / `"upright_defect_head"` (what the image score is taken
        on)."""
        batch = pixel_values.shape[0]
        flips = [MAP_FLIPS[name] for name in self.config.map_flips or []]
        # The upright view and every flipped view in one pass: (B * (1 + flips), ...).
        views = (
            torch.cat([pixel_values] + [pixel_values.flip(dims) for dims in flips]) if flips else pixel_values
        )
        features = self.patch_features(views)
        grids = {"distance": self.distances_of(features)}
        if self.defect_head is not None:
            grids["defect_head"] = self._query_pool(self.defect_head(features)[:, None])[:, 0]
        averaged = {}
        for name, grid in grids.items():
            upright = grid[:batch]
            averaged[f"upright_{name}"] = upright
            # each flipped view's grid flipped back onto the upright one, then averaged
            flipped = [grid[batch * (i + 1) : batch * (i + 2)].flip(dims) for i, dims in enumerate(flips)]
            averaged[name] = torch.stack([upright, *flipped]).mean(0) if flips else upright
        return averaged

    def fuse(self, distance: torch.Tensor, defect_head: torch.Tensor | None) -> torch.Tensor:
        """The anomaly grid: the distances alone, or with a defect head `(1 - w) * z(distance) + w * z(head)`,
        each standardised by `defect_head_statistics` (normal pixels' mean and std of each map)."""
        if defect_head is None:
            return distance
        distance_mean, distance_std, head_mean, head_std = self.config.defect_head_statistics or (0, 1, 0, 1)
        weight = self.config.defect_head_weight
        return (1 - weight) * (distance - distance_mean) / distance_std + weight * (
            defect_head - head_mean
        ) / head_std

    def score_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, h, w) distances -> the grid the image score is taken on: divided by the border profile, if any."""
        profile = self.config.border_profile
        return grid if not profile else grid / ring_scale(*grid.shape[-2:], profile, grid)

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> AnomalyOutput:
        """(B, 3, H, W) normalised images -> maps (B, H, W) at the input size, image scores (B,), decisions."""
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        height, width = pixel_values.shape[-2:]
        grids = self.component_grids(pixel_values)
        map_grid = self.fuse(grids["distance"], grids.get("defect_head"))
        maps = upsample_blur(map_grid, (height, width), self.config.sigma)  # (B, H, W)
        score_grid = self.fuse(self.score_grid(grids["upright_distance"]), grids.get("upright_defect_head"))
        scores = image_scores(score_grid, self.config.image_score, self.config.top_fraction)
        return AnomalyOutput(anomaly_maps=maps, image_scores=scores, **self._decisions(maps, scores))

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor) -> AnomalyOutput:
        return self(pixel_values)


__all__ = ["AnomalyOutput", "AnomalyPreTrainedModel", "DefectHead", "PatchMemoryModel"]
