"""The patch-memory scorer's defect head: synthetic training cells, training, the fused map, saving and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cadmtl.anomaly import PatchMemoryScorer
from cadmtl.anomaly.defect_head import (
    HIDDEN_UNITS,
    fit_defect_head,
    fit_head_statistics,
    synthetic_cells,
    to_uint8,
    train_defect_head,
)
from cadmtl.anomaly.learner import normalize
from cadmtl.evaluation.metrics.binary import binary_auroc
from cadmtl.features import backbone_from_config
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import upsample_blur

from .test_patch_memory import normal_images, tiny_vit_config

SIZE = 64


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return backbone_from_config(tiny_vit_config()).eval()


def image_batch(count: int, seed: int) -> torch.Tensor:
    """`normal_images` brought into the ImageNet-normalised range of real pixel values (so uint8 round trips)."""
    images = normal_images(count, seed=seed, size=SIZE)
    return ((images.clamp(-1.2, 1.2) * 0.2 + 0.45) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / (
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    )


@pytest.fixture(scope="module")
def scorer(backbone) -> PatchMemoryScorer:
    model = PatchMemoryScorer.from_backbone(
        backbone, layers=[1, 2], coreset_fraction=1.0, image_size=(SIZE, SIZE), map_flips=["h"]
    )
    model.fit(image_batch(4, seed=0))
    fit_defect_head(model, [image_batch(8, seed=1), image_batch(8, seed=2)], [image_batch(3, seed=3)], seed=0)
    return model


def test_to_uint8_inverts_the_normalisation() -> None:
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    assert torch.equal(to_uint8(normalize(images, mean, std), mean, std), images)


def test_synthetic_cells_hold_both_kinds_and_repeat_with_the_seed(scorer) -> None:
    batches = [image_batch(8, seed=1)]
    cells, labels = synthetic_cells(scorer, batches, seed=5)
    again, again_labels = synthetic_cells(scorer, batches, seed=5)
    assert cells.dtype == torch.float16 and cells.shape[1] == scorer.extractor.num_channels
    assert 0 < int(labels.sum()) < len(labels) and len(cells) == len(labels)
    assert torch.equal(cells, again) and torch.equal(labels, again_labels)
    with pytest.raises(
        ValueError, match=r"the defect head is fitted on square inputs; this scorer's are \(64, 48\)"
    ):
        synthetic_cells(scorer, [image_batch(1, seed=1)[..., :48]], seed=0)


def test_train_defect_head_separates_the_classes_it_is_shown() -> None:
    generator = torch.Generator().manual_seed(0)
    negatives = torch.randn(2000, 16, generator=generator)
    positives = torch.randn(200, 16, generator=generator) + torch.linspace(-1, 1, 16)
    head, loss = train_defect_head(torch.cat([negatives, positives]), torch.arange(2200) >= 2000, hidden=8)
    assert not head.training and np.isfinite(loss)
    assert head.input_mean.shape == (16,) and head.hidden.out_features == 8
    with torch.no_grad():
        held_out = torch.cat([torch.randn(300, 16), torch.randn(300, 16) + torch.linspace(-1, 1, 16)])
        probabilities = head.logits(held_out).sigmoid().numpy()
    assert binary_auroc(probabilities, np.arange(600) >= 300) > 0.95


def test_the_map_is_the_fusion_of_the_standardised_maps(scorer) -> None:
    config = scorer.config
    assert config.defect_head_hidden == HIDDEN_UNITS and config.defect_head_weight == 0.25
    # the statistics are those of the held-out normals' blurred maps
    normals = image_batch(3, seed=3)
    with torch.no_grad():
        grids = scorer.component_grids(normals)
    distance = upsample_blur(grids["distance"], (SIZE, SIZE), config.sigma)
    head = upsample_blur(grids["defect_head"], (SIZE, SIZE), config.sigma)
    expected = [distance.mean(), distance.std(unbiased=False), head.mean(), head.std(unbiased=False)]
    assert config.defect_head_statistics == pytest.approx([float(v) for v in expected], rel=1e-4)
    assert fit_head_statistics(scorer, [normals]) == pytest.approx(config.defect_head_statistics)

    query = image_batch(2, seed=4)
    query[1, :, 8:24, 40:56] = 2.0
    with torch.no_grad():
        grids = scorer.component_grids(query)
    assert grids["distance"].shape == grids["defect_head"].shape == (2, 4, 4)
    assert ((grids["defect_head"] >= 0) & (grids["defect_head"] <= 1)).all()  # probabilities
    d_mean, d_std, h_mean, h_std = config.defect_head_statistics
    fused = 0.75 * (grids["distance"] - d_mean) / d_std + 0.25 * (grids["defect_head"] - h_mean) / h_std
    maps, scores = scorer.score(query)
    torch.testing.assert_close(maps, upsample_blur(fused, (SIZE, SIZE), config.sigma))
    upright = 0.75 * (grids["upright_distance"] - d_mean) / d_std
    upright = upright + 0.25 * (grids["upright_defect_head"] - h_mean) / h_std
    torch.testing.assert_close(
        scores, upright.flatten(1).topk(1, dim=1).values.mean(1)
    )  # top 1 % of 16 cells
    assert scores[1] > scores[0]


def test_a_scorer_with_a_head_saves_and_loads_to_the_same_maps(scorer, tmp_path) -> None:
    query = image_batch(2, seed=6)
    scorer.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert weights["defect_head.hidden.weight"].shape == (HIDDEN_UNITS, scorer.extractor.num_channels)
    assert {"defect_head.input_mean", "defect_head.input_std", "defect_head.output.bias"} <= set(weights)
    loaded = PatchMemoryScorer.from_pretrained(tmp_path)
    assert loaded.config.defect_head_statistics == scorer.config.defect_head_statistics
    for got, expected in zip(loaded.score(query), scorer.score(query), strict=True):
        torch.testing.assert_close(got, expected)
    # the weight can be changed in config.json without refitting; 0 leaves the standardised distances
    loaded.config.defect_head_weight = 0.0
    d_mean, d_std = scorer.config.defect_head_statistics[:2]
    without_head = PatchMemoryScorer.from_backbone(
        scorer.backbone, layers=[1, 2], coreset_fraction=1.0, image_size=(SIZE, SIZE), map_flips=["h"]
    )
    without_head.set_memory_bank(scorer.memory_bank)
    torch.testing.assert_close(loaded.score(query)[0], (without_head.score(query)[0] - d_mean) / d_std)


def test_config_refuses_bad_head_settings(scorer) -> None:
    config = scorer.config.to_dict()
    for key, value, message in [
        ("defect_head_weight", 1.5, r"defect_head_weight must lie in \[0, 1\]; got 1.5"),
        ("defect_head_hidden", 0, "defect_head_hidden must be a positive integer or None; got 0"),
        ("defect_head_statistics", [0.0, 0.0, 0.0, 1.0], "defect_head_statistics must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            type(scorer.config).from_dict({**config, key: value})
