"""Fitting the patch-memory scorer's defect head (`PatchMemoryModel.defect_head`, `cadmtl anomaly fit --defect-head`).

The memory alone answers "how far is this patch from every normal one"; on car photos that ranks reflections and
rare normal parts as high as small defects (RESULTS.md, session 11). The head adds "does this patch look damaged":
a small MLP on the same frozen patch features, trained to find synthetic anomalies pasted into the normal bank
images. The anomalies are the learner's texture kinds (`SYNTHESIS_MIXES["texture"]`: smooth-noise blends of other
textures, cut-paste patches, uneven brightness, thin strokes, edge damage), never the procedural car-defect
painter that makes the `_ad` configs' synthetic test defects, so a head fitted here has not seen the defects it is
evaluated on.

Steps, each a function below:
1. `synthetic_cells`: every bank unit (tile or whole image, at the scorer's size) gets one synthetic anomaly; a
   feature cell is a positive where at least `POSITIVE_SHARE` of it changed, and `NEGATIVE_KEEP` of the untouched
   cells are kept as negatives.
2. `train_defect_head`: the MLP on standardised cells, binary cross-entropy weighted by the class ratio.
3. `fit_head_statistics`: the mean and std of the distance map and of the head map over held-out normal images,
   which put the two on one scale for the fusion `(1 - w) * z(distance) + w * z(head)`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modeling_cadmtl_anomaly.features_cadmtl_anomaly import upsample_blur
from modeling_cadmtl_anomaly.modeling_cadmtl_anomaly import DefectHead, PatchMemoryModel

from .learner import normalize, synthesize_anomalies

logger = logging.getLogger("cadmtl.anomaly")

HEAD_SYNTHESIS = (
    "texture"  # no procedural car defects: the `_ad` configs' synthetic test defects come from those
)
POSITIVE_SHARE = 0.25  # a cell counts as anomalous where at least this share of its pixels changed
NEGATIVE_KEEP = 0.05  # share of the untouched cells kept as negatives (they outnumber the positives ~20:1)
HIDDEN_UNITS = 128
EPOCHS = 6
MIN_STEPS = 300  # a small bank gets more epochs, so that the head is trained at all


def to_uint8(pixel_values: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """(B, 3, S, S) normalised pixel values -> the uint8 images they were made from."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return ((pixel_values.float() * std_t + mean_t) * 255).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def synthetic_cells(
    scorer: PatchMemoryModel, pixel_batches: Iterable[torch.Tensor], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cells (N, C) float16, labels (N,) bool) from normal (B, 3, S, S) pixel values, each given one synthetic
    anomaly of `HEAD_SYNTHESIS`."""
    config = scorer.config
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    cells, labels = [], []
    for pixel_values in pixel_batches:
        if pixel_values.shape[-1] != pixel_values.shape[-2]:
            raise ValueError(
                f"the defect head is fitted on square inputs; this scorer's are {tuple(pixel_values.shape[-2:])}"
            )
        images = to_uint8(pixel_values, config.image_mean, config.image_std)
        anomalous, changed = synthesize_anomalies(images, rng, probability=1.0, mix=HEAD_SYNTHESIS)
        features = scorer.patch_features(normalize(anomalous, config.image_mean, config.image_std)).cpu()
        shares = F.adaptive_avg_pool2d(changed.float()[:, None], features.shape[-2:])[:, 0].reshape(-1)
        features = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        positive = shares >= POSITIVE_SHARE
        keep = positive | ((shares == 0) & (torch.rand(len(shares), generator=generator) < NEGATIVE_KEEP))
        cells.append(features[keep].half())
        labels.append(positive[keep])
    if not cells:
        raise ValueError("the defect head needs at least one normal image")
    cells_t, labels_t = torch.cat(cells), torch.cat(labels)
    if labels_t.all() or not labels_t.any():
        raise ValueError(
            f"the synthetic anomalies gave {int(labels_t.sum())} anomalous of {len(labels_t)} cells: the head "
            "needs both kinds"
        )
    return cells_t, labels_t


def train_defect_head(
    cells: torch.Tensor,
    labels: torch.Tensor,
    hidden: int = HIDDEN_UNITS,
    epochs: int = EPOCHS,
    seed: int = 0,
    batch_size: int = 1024,
    min_steps: int = MIN_STEPS,
) -> tuple[DefectHead, float]:
    """A `DefectHead` trained on (N, C) cells and (N,) bool labels (AdamW, positive-weighted BCE) for `epochs`, or
    for as many as `min_steps` optimiser steps take; returns it in eval mode with the mean loss of its last
    epoch."""
    torch.manual_seed(seed)
    x, y = cells.float(), labels.float()
    head = DefectHead(x.shape[1], hidden)
    head.input_mean.copy_(x.mean(0))
    head.input_std.copy_(x.std(0) + 1e-4)
    optimizer = torch.optim.AdamW(head.parameters(), 1e-3, weight_decay=1e-2)
    positive_weight = (1 - y).sum() / y.sum().clamp_min(1)
    generator = torch.Generator().manual_seed(seed)
    last_loss = float("nan")
    epochs = max(epochs, math.ceil(min_steps / math.ceil(len(x) / batch_size)))
    for _ in tqdm(range(epochs), desc="defect head epochs", leave=False):
        losses = []
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = F.binary_cross_entropy_with_logits(
                head.logits(x[batch]), y[batch], pos_weight=positive_weight
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        last_loss = float(np.mean(losses))
    return head.eval(), last_loss


@torch.no_grad()
def fit_head_statistics(scorer: PatchMemoryModel, pixel_batches: Iterable[torch.Tensor]) -> list[float]:
    """`[distance mean, distance std, head mean, head std]` of the two blurred maps over held-out normal images
    (never the fitted ones: each would find itself in the memory at distance 0), set as
    `config.defect_head_statistics`."""
    totals = torch.zeros(2, 3, dtype=torch.float64)  # per map: count, sum, sum of squares
    for pixel_values in pixel_batches:
        grids = scorer.component_grids(pixel_values)
        for row, name in enumerate(("distance", "defect_head")):
            values = upsample_blur(grids[name], pixel_values.shape[-2:], scorer.config.sigma).double()
            totals[row] += torch.stack([torch.tensor(values.numel()), values.sum(), values.square().sum()])
    if totals[0, 0] == 0:
        raise ValueError("the defect head's statistics need at least one held-out normal image")
    count, total, squares = totals.unbind(1)
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    statistics = [float(mean[0]), float(std[0]), float(mean[1]), float(std[1])]
    scorer.config.defect_head_statistics = statistics
    return statistics


def fit_defect_head(
    scorer: PatchMemoryModel,
    bank_batches: Iterable[torch.Tensor],
    normal_batches: Iterable[torch.Tensor],
    seed: int,
) -> dict:
    """Train `scorer.defect_head` on synthetic anomalies of the bank's pixel values and standardise it on the
    held-out normals' (both iterables of (B, 3, S, S)); returns what the fit's summary records."""
    cells, labels = synthetic_cells(scorer, bank_batches, seed)
    head, loss = train_defect_head(cells, labels, seed=seed)
    scorer.config.defect_head_hidden = head.hidden.out_features
    scorer.defect_head = head.to(next(scorer.parameters()).device)
    statistics = fit_head_statistics(scorer, normal_batches)
    logger.info(
        "defect head: %d cells (%d anomalous), last-epoch loss %.3f, normal statistics %s",
        len(cells),
        int(labels.sum()),
        loss,
        statistics,
    )
    return {
        "synthesis": HEAD_SYNTHESIS,
        "cells": len(cells),
        "anomalous_cells": int(labels.sum()),
        "last_epoch_loss": loss,
        "weight": scorer.config.defect_head_weight,
        "statistics": statistics,
    }
