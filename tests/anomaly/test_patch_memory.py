"""PatchFeatureExtractor and PatchMemoryScorer on tiny random DINOv3 backbones (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import DINOv3ConvNextConfig, DINOv3ViTBackbone, DINOv3ViTConfig

from cadmtl.anomaly import PatchMemoryScorer, calibrate_f1, calibrate_fpr, gaussian_blur
from cadmtl.features import (
    PatchFeatureExtractor,
    backbone_from_cadmtl,
    backbone_from_config,
    backbone_from_preset,
)
from modeling_cadmtl import CadMtlConfig, CadMtlModel
from modeling_cadmtl_anomaly.features_cadmtl_anomaly import (
    NearestImageMemory,
    border_profile,
    image_scores,
    ring_scale,
    upsample_blur,
)

SIZE = 64


def tiny_vit_config(**kwargs) -> DINOv3ViTConfig:
    settings = {
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "patch_size": 16,
        "num_register_tokens": 2,
        "intermediate_size": 64,
        "pos_embed_rescale": None,
        **kwargs,
    }
    return DINOv3ViTConfig(**settings)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return backbone_from_config(tiny_vit_config()).eval()


def normal_images(count: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """A shared smooth texture plus small noise: (count, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    texture = torch.stack([torch.sin(x / 5.0), torch.cos(y / 7.0), torch.sin((x + y) / 9.0)])
    return texture + 0.05 * torch.randn(count, 3, size, size, generator=generator)


def test_vit_patch_tokens_match_transformers_backbone(backbone):
    reference = DINOv3ViTBackbone(tiny_vit_config(out_indices=[1, 2], apply_layernorm=True)).eval()
    reference.load_state_dict(backbone.state_dict())
    pixels = torch.randn(2, 3, SIZE, 48)
    extractor = PatchFeatureExtractor(backbone, [1, 2], aggregate=False)
    with torch.no_grad():
        features = extractor(pixels)
        expected = torch.cat(reference(pixels).feature_maps, dim=1)
    assert features.shape == (2, 64, 4, 3)  # CLS and 2 register tokens dropped, 4 x 3 grid
    torch.testing.assert_close(features, expected)
    aggregated = PatchFeatureExtractor(backbone, [1, 2], aggregate=True)(pixels).detach()
    torch.testing.assert_close(aggregated[..., 1, 1], features[..., :3, :3].mean(dim=(-2, -1)))


def test_convnext_stages_are_upsampled_to_the_first_layer_and_cadmtl_backbone():
    convnext = backbone_from_config(DINOv3ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]))
    extractor = PatchFeatureExtractor(convnext, [2, 3])
    assert extractor(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 16 + 32, 8, 8)
    assert extractor.stride == 8 and extractor.num_channels == 48
    config = CadMtlConfig(
        backbone_config=tiny_vit_config(out_indices=[1, 2, 3]),
        cls_labels=["normal", "worn"],
        det_labels=["dent"],
        seg_labels=["background", "dent"],
        neck_channels=16,
        seg_channels=16,
    )
    cadmtl_extractor = PatchFeatureExtractor(backbone_from_cadmtl(CadMtlModel(config)), [3])
    assert cadmtl_extractor(torch.randn(1, 3, 32, 32)).shape == (1, 32, 2, 2)
    preset = PatchFeatureExtractor(backbone_from_preset("tiny"), [2, 4])  # 4 layers, hidden 64, 4 registers
    assert preset(torch.randn(1, 3, 32, 48)).shape == (1, 128, 2, 3)
    with pytest.raises(
        ValueError, match=r"checkpoint feature layers \[0\] do not match a backbone of 4 layers"
    ):
        PatchFeatureExtractor(backbone_from_preset("tiny"), [0])


def test_wrong_layers_and_empty_bank_errors(backbone):
    with pytest.raises(
        ValueError, match=r"checkpoint feature layers \[2, 4\] do not match a backbone of 3 layers"
    ):
        PatchMemoryScorer.from_backbone(backbone, layers=[2, 4])
    scorer = PatchMemoryScorer.from_backbone(backbone, layers=[2], image_size=(SIZE, SIZE))
    with pytest.raises(ValueError, match="memory bank is empty"):
        scorer.score(torch.zeros(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        PatchMemoryScorer.from_backbone(backbone, layers=[2], image_size=(60, 64)).fit(
            [torch.zeros(3, 60, 64)]
        )


def test_shapes_copy_scores_zero_and_other_sizes(backbone):
    images = normal_images(4)
    scorer = PatchMemoryScorer.from_backbone(backbone, layers=[1, 2], image_size=(SIZE, SIZE)).fit(
        list(images), few_shot=True
    )
    assert scorer.memory_bank.shape == (4 * 16, 64)  # few-shot: every patch, no coreset
    maps, scores = scorer.score(images[:2])
    assert maps.shape == (2, SIZE, SIZE) and scores.shape == (2,)
    # Fitted images score ~0 (not bit-exactly: a batch of 2 runs other BLAS paths than the batch of 4).
    assert scores.abs().max() < 1e-5 and maps.abs().max() < 1e-5
    maps, scores = scorer.score(torch.randn(3, 3, 80, 96))  # resized to 64 x 64, maps back at 80 x 96
    assert maps.shape == (3, 80, 96) and bool((scores > 1.0).all())
    coreset = PatchMemoryScorer.from_backbone(
        backbone, layers=[1, 2], coreset_fraction=0.25, image_size=(SIZE, SIZE)
    )
    assert coreset.fit(images, batch_size=3).memory_bank.shape == (16, 64)  # batch input, 25 % of 64 patches


@pytest.mark.parametrize(
    "aggregate,square",
    [
        (False, (48, 64, 64, 80)),
        (True, (48, 80, 48, 80)),
    ],  # 1 patch raw; 2 x 2 patches with 3 x 3 aggregation
)
def test_pasted_square_scores_higher_and_map_peaks_inside(backbone, aggregate, square):
    # 8 x 8 patch grid. With aggregation, the averaged neighbours of a 1-patch defect are as novel as the defect
    # itself (PatchCore's receptive field), so the aggregated case uses a defect of 2 x 2 patches.
    top, bottom, left, right = square
    scorer = PatchMemoryScorer.from_backbone(
        backbone, layers=[1, 2], coreset_fraction=0.5, image_size=(128, 128), aggregate=aggregate
    ).fit(normal_images(6, size=128))
    query = normal_images(2, seed=1, size=128)
    query[1, :, top:bottom, left:right] = 3.0
    maps, scores = scorer.score(query)
    assert scores[1] > 2 * scores[0]
    row, col = divmod(int(maps[1].argmax()), 128)
    assert top <= row < bottom and left <= col < right
    assert maps[1, top:bottom, left:right].mean() > 2 * maps[1, 100:, :30].mean()


def test_save_and_load_score_identically(backbone, tmp_path):
    scorer = PatchMemoryScorer.from_backbone(
        backbone, layers=[2, 3], coreset_fraction=0.5, image_size=(SIZE, SIZE), image_score="max"
    ).fit(normal_images(4))
    query = normal_images(3, seed=2)
    query[0, :, :16, :16] = -2.0
    maps, scores = scorer.score(query)
    scorer.image_threshold = calibrate_fpr(scores[1:], target_fpr=0.0)
    scorer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "cadmtl_patch_memory" and config["architectures"] == ["PatchMemoryModel"]
    assert (
        config["layers"] == [2, 3] and config["image_size"] == [SIZE, SIZE] and config["image_score"] == "max"
    )
    assert config["pixel_threshold"] is None and config["image_threshold"] == scorer.image_threshold
    assert config["backbone_config"]["num_register_tokens"] == 2 and config["memory_bank_size"] == 32
    # The memory bank is a buffer of the weights; the Hub code files and the processor ship alongside.
    assert load_file(tmp_path / "model.safetensors")["memory_bank"].shape == (32, 64)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_cadmtl_anomaly.py"} <= {
        p.name for p in tmp_path.iterdir()
    }
    loaded = PatchMemoryScorer.from_pretrained(tmp_path)
    loaded_maps, loaded_scores = loaded.score(query)
    assert torch.equal(loaded_maps, maps) and torch.equal(loaded_scores, scores)
    assert loaded.image_threshold == scorer.image_threshold
    prediction = loaded.predict(query)
    assert prediction.is_anomalous.tolist() == [True, False, False] and prediction.defect_masks is None


def test_approximate_search_scorer_close_to_exact_and_saved(backbone, tmp_path):
    images, query = normal_images(4), normal_images(2, seed=3)
    query[1, :, 16:32, 16:32] = 3.0
    exact = PatchMemoryScorer.from_backbone(
        backbone, layers=[1, 2], coreset_fraction=0.5, image_size=(SIZE, SIZE)
    ).fit(images)
    fast = PatchMemoryScorer.from_backbone(
        backbone,
        layers=[1, 2],
        coreset_fraction=0.5,
        image_size=(SIZE, SIZE),
        search_dtype="bfloat16",
        search_projection_dim=16,
        num_candidates=16,  # half the bank: the re-rank is then exact in practice
    ).fit(images)
    assert fast.index() is fast.index()  # built once per bank
    torch.testing.assert_close(fast.score(query)[1], exact.score(query)[1], rtol=1e-4, atol=1e-4)
    fast.save_pretrained(tmp_path)
    assert PatchMemoryScorer.from_pretrained(tmp_path).index().search_bank.dtype == torch.bfloat16


def test_threshold_calibration():
    normal = torch.arange(100, dtype=torch.float32)  # 0..99
    threshold = calibrate_fpr(normal, target_fpr=0.05)
    assert int((normal >= threshold).sum()) == 5 and 94 < threshold <= 95
    assert calibrate_fpr(normal, target_fpr=0.0) > 99
    assert calibrate_f1([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.35)


def test_gaussian_blur_keeps_mass_and_constants():
    impulse = torch.zeros(1, 64, 64)
    impulse[0, 32, 32] = 1.0
    blurred = gaussian_blur(impulse, sigma=4)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred[0, 32, 32].item() == pytest.approx(1 / (2 * torch.pi * 16), rel=1e-2)
    torch.testing.assert_close(
        gaussian_blur(torch.full((2, 20, 30), 3.0), sigma=4), torch.full((2, 20, 30), 3.0)
    )


@pytest.mark.parametrize(
    ("grid", "size", "sigma"),
    [
        ((14, 14), (224, 224), 4.0),
        ((28, 20), (224, 160), 4.0),
        ((12, 40), (100, 333), 2.5),
        ((14, 14), (224, 224), 0.0),
        ((3, 5), (7, 9), 4.0),  # output smaller than the blur radius: replicate padding, as gaussian_blur
    ],
)
def test_upsample_blur_equals_upsampling_then_blurring(grid, size, sigma):
    maps = torch.rand(3, *grid, generator=torch.Generator().manual_seed(0)) * 10
    upsampled = torch.nn.functional.interpolate(
        maps[:, None], size=size, mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(upsample_blur(maps, size, sigma), gaussian_blur(upsampled[:, 0], sigma))


def test_convnext_scorer_round_trip(tmp_path):
    torch.manual_seed(0)
    convnext = backbone_from_config(DINOv3ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]))
    scorer = PatchMemoryScorer.from_backbone(
        convnext.eval(), layers=[2, 3], coreset_fraction=0.25, image_size=(SIZE, SIZE)
    )
    scorer.fit(normal_images(2))
    assert scorer.memory_bank.shape == (32, 48)  # 2 images x 8 x 8 cells x 25 %, 16 + 32 channels
    query = normal_images(1, seed=4)
    maps, scores = scorer.score(query)
    scorer.save_pretrained(tmp_path)
    loaded_maps, loaded_scores = PatchMemoryScorer.from_pretrained(tmp_path).score(query)
    assert (
        maps.shape == (1, SIZE, SIZE)
        and torch.equal(loaded_maps, maps)
        and torch.equal(loaded_scores, scores)
    )


def test_inverted_file_search_is_configured_saved_and_loaded(backbone, tmp_path):
    images, query = normal_images(4), normal_images(2, seed=3)
    exact = PatchMemoryScorer.from_backbone(
        backbone, layers=[1, 2], coreset_fraction=1.0, image_size=(SIZE, SIZE)
    ).fit(images)
    ivf = PatchMemoryScorer.from_backbone(
        backbone,
        layers=[1, 2],
        coreset_fraction=1.0,
        image_size=(SIZE, SIZE),
        search_num_lists=6,
        search_num_probes=6,  # every list: the exact scores
    ).fit(images)
    assert ivf.index() is ivf.index() and ivf.index().num_lists == 6
    torch.testing.assert_close(ivf.score(query)[1], exact.score(query)[1], rtol=0, atol=0)
    ivf.config.search_num_probes = 2
    ivf._index = None
    ivf.save_pretrained(tmp_path)
    loaded = PatchMemoryScorer.from_pretrained(tmp_path)
    assert (loaded.config.search_num_lists, loaded.config.search_num_probes) == (6, 2)
    assert loaded.index().num_probes == 2
    # the seeded k-means rebuilds the same lists, so the loaded scorer scores as the saved one
    assert torch.equal(loaded.index().centroids, ivf.index().centroids)
    assert torch.equal(loaded.score(query)[1], ivf.score(query)[1])
    with pytest.raises(ValueError, match="num_probes must be between 1 and num_lists"):
        PatchMemoryScorer.from_backbone(backbone, layers=[1, 2], search_num_lists=4, search_num_probes=5)


def test_query_stride_searches_the_averaged_grid_and_is_saved(backbone, tmp_path):
    # 96 px / patch 16 = a 6 x 6 grid; stride 4 averages 4 x 4 cells, the last window only its 2 x 2 real cells
    size = 96
    images, query = normal_images(3, size=size), normal_images(2, seed=3, size=size)
    query[1, :, 40:72, 40:72] = 3.0
    kwargs = {"layers": [1, 2], "coreset_fraction": 1.0, "image_size": (size, size)}
    every_cell = PatchMemoryScorer.from_backbone(backbone, **kwargs).fit(images)
    strided = PatchMemoryScorer.from_backbone(backbone, query_stride=4, **kwargs).fit(images)
    torch.testing.assert_close(strided.memory_bank, every_cell.memory_bank)  # the bank keeps every cell

    features = every_cell.patch_features(query)  # (2, C, 6, 6)
    pooled = torch.stack(
        [
            torch.stack([features[..., r : r + 4, c : c + 4].mean(dim=(-2, -1)) for c in (0, 4)], dim=-1)
            for r in (0, 4)
        ],
        dim=-2,
    )  # (2, C, 2, 2): windows rows / cols 0-3 and 4-5
    distances = every_cell.index().search(pooled.permute(0, 2, 3, 1).reshape(-1, pooled.shape[1]))
    expected = distances.view(2, 4).topk(1, dim=1).values.mean(dim=1)  # top 1 % of 4 cells: the max
    maps, scores = strided.score(query)
    torch.testing.assert_close(scores, expected)
    assert maps.shape == (2, size, size) and scores[1] > scores[0]
    strided.save_pretrained(tmp_path)
    assert PatchMemoryScorer.from_pretrained(tmp_path).config.query_stride == 4
    with pytest.raises(ValueError, match="query_stride must be a positive integer; got 0"):
        PatchMemoryScorer.from_backbone(backbone, query_stride=0, **kwargs)


def test_map_flips_average_the_flipped_back_grids_and_keep_the_upright_score(backbone, tmp_path):
    size = 64
    images, query = normal_images(3, size=size), normal_images(2, seed=3, size=size)
    query[1, :, 8:24, 40:56] = 3.0  # off-centre, so a flip that is not undone would move the peak
    kwargs = {"layers": [1, 2], "coreset_fraction": 1.0, "image_size": (size, size)}
    # the bank holds the flipped normals too, so only the defect is far from it in every view
    bank_images = torch.cat([images, images.flip(-1), images.flip(-2, -1)])
    upright = PatchMemoryScorer.from_backbone(backbone, **kwargs).fit(bank_images)
    flipped = PatchMemoryScorer.from_backbone(backbone, map_flips=["h", "hv"], **kwargs)
    flipped.set_memory_bank(upright.memory_bank)

    grid = upright.distance_grid(query)  # (2, 4, 4)
    expected_grid = (grid + upright.distance_grid(query.flip(-1)).flip(-1)) / 2
    expected_grid = (2 * expected_grid + upright.distance_grid(query.flip(-2, -1)).flip(-2, -1)) / 3
    maps, scores = flipped.score(query)
    upright_maps, upright_scores = upright.score(query)
    torch.testing.assert_close(scores, upright_scores)  # the image score is the upright view's
    torch.testing.assert_close(maps, upsample_blur(expected_grid, (size, size), flipped.config.sigma))
    assert not torch.allclose(maps, upright_maps)
    peak = maps[1].flatten().argmax()
    assert peak // size < size // 2 <= peak % size  # the peak stays in the defect's (top right) quarter

    flipped.save_pretrained(tmp_path)
    assert PatchMemoryScorer.from_pretrained(tmp_path).config.map_flips == ["h", "hv"]
    with pytest.raises(
        ValueError, match=r"map_flips must be distinct names among \['h', 'hv', 'v'\]; got \['d'\]"
    ):
        PatchMemoryScorer.from_backbone(backbone, map_flips=["d"], **kwargs)
    with pytest.raises(ValueError, match="map_flips must be distinct"):
        PatchMemoryScorer.from_backbone(backbone, map_flips=["h", "h"], **kwargs)


def brute_force_nearest_images(bank, descriptors, queries, query_descriptors, num_images):
    """(B, Q) distances of each query patch to its nearest patch among its K nearest images, by plain loops."""
    rows = []
    for query, descriptor in zip(queries, query_descriptors):
        nearest = ((descriptors - descriptor).norm(dim=1)).argsort()[:num_images]
        patches = bank[nearest].reshape(-1, bank.shape[-1]).float()
        rows.append(torch.stack([(patches - patch).norm(dim=1).min() for patch in query]))
    return torch.stack(rows)


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_nearest_image_memory_matches_brute_force(projection_dim):
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(7, 20, 16, generator=generator)  # 7 images of 20 patches
    descriptors = bank.mean(1)
    queries = torch.randn(4, 12, 16, generator=generator)
    query_descriptors = bank[[1, 4, 6]].mean(1) + 0.01 * torch.randn(3, 16, generator=generator)
    query_descriptors = torch.cat([query_descriptors, query_descriptors[:1]])  # rows 0 and 3 share one gather
    projection = None if projection_dim is None else torch.randn(16, projection_dim, generator=generator)
    # 40 candidates out of 3 * 20 patches: the projected search is then exact in practice
    memory = NearestImageMemory(
        bank, descriptors, 3, projection_matrix=projection, num_candidates=40, chunk_size=5
    )
    assert memory.nearest_images(query_descriptors)[:, 0].tolist() == [1, 4, 6, 1]
    expected = brute_force_nearest_images(bank, descriptors, queries, query_descriptors, 3)
    torch.testing.assert_close(memory.search(queries, query_descriptors), expected, rtol=1e-5, atol=1e-5)
    # K clamped to the images held: every patch is a candidate
    everything = NearestImageMemory(bank, descriptors, 100)
    torch.testing.assert_close(
        everything.search(queries, query_descriptors),
        brute_force_nearest_images(bank, descriptors, queries, query_descriptors, 7),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(
        ValueError, match=r"descriptors must be \(images, channels\) = \(7, 16\); got \(6, 16\)"
    ):
        NearestImageMemory(bank, descriptors[:6], 3)


def test_border_profile_and_ring_scale():
    grids = torch.ones(4, 7, 9)
    grids[:, 0, :] = grids[:, -1, :] = grids[:, :, 0] = grids[:, :, -1] = 3.0  # ring 0
    grids[:, 1:-1, 1] = grids[:, 1:-1, -2] = grids[:, 1, 1:-1] = grids[:, -2, 1:-1] = 2.0  # ring 1
    profile = border_profile(grids, rings=5)  # 7 cells high: only 3 rings leave an interior
    assert profile == pytest.approx([3.0, 2.0, 1.0, 1.0])
    scale = ring_scale(7, 9, profile, grids)
    torch.testing.assert_close(grids / scale, torch.ones(4, 7, 9))
    assert border_profile(torch.ones(2, 2, 2), rings=5) is None  # no interior
    assert border_profile(torch.zeros(2, 9, 9), rings=2) is None  # nothing to divide by


def test_dense_memory_scorer_fits_every_patch_in_float16_saves_and_flags_defects(backbone, tmp_path):
    images, held_out = normal_images(5), normal_images(3, seed=7)
    query = normal_images(2, seed=3)
    query[1, :, 16:32, 16:32] = 3.0
    kwargs = {"layers": [1, 2], "image_size": (SIZE, SIZE), "coreset_fraction": 0.1}
    dense = PatchMemoryScorer.from_backbone(backbone, neighbour_images=2, **kwargs).fit(images)
    grid_cells = (SIZE // 16) ** 2
    assert dense.memory_bank.shape == (5 * grid_cells, 64) and dense.memory_bank.dtype == torch.float16
    assert dense.image_descriptors.shape == (5, 64) and dense.config.memory_images == 5
    assert dense.config.coreset_fraction == 1.0  # no coreset: every patch is kept
    # the same as brute force over the query's 2 nearest images
    features = dense.patch_features(query)
    expected = brute_force_nearest_images(
        dense.memory_bank.view(5, grid_cells, 64),
        dense.image_descriptors,
        features.flatten(2).transpose(1, 2),
        features.mean((2, 3)),
        2,
    )
    torch.testing.assert_close(dense.distance_grid(query).flatten(1), expected, rtol=1e-4, atol=1e-4)
    assert dense.distance_grid(images[:1]).abs().max() < 1e-2  # a fitted image finds itself (float16 bank)
    maps, scores = dense.score(query)
    assert scores[1] > scores[0] and maps[1, 16:32, 16:32].mean() > maps[1, 40:, 40:].mean()

    profile = dense.fit_border_profile(held_out)  # 4 x 4 grid: one ring and the interior
    assert len(profile) == 2 and profile[-1] == 1.0 and profile[0] > 0
    grid = dense.distance_grid(query)
    torch.testing.assert_close(
        dense.score(query)[1], image_scores(grid / ring_scale(4, 4, profile, grid), "top_mean", 0.01)
    )
    dense.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert weights["memory_bank"].dtype == torch.float16 and weights["image_descriptors"].shape == (5, 64)
    loaded = PatchMemoryScorer.from_pretrained(tmp_path)
    assert loaded.memory_bank.dtype == torch.float16 and loaded.config.border_profile == profile
    loaded_maps, loaded_scores = loaded.score(query)
    assert torch.equal(loaded_maps, dense.score(query)[0]) and torch.equal(
        loaded_scores, dense.score(query)[1]
    )
    # a dtype cast leaves the dense memory float16 and uncopied (a float32 copy of a tile model is 3 GB); the
    # backbone and the descriptors follow the cast, and the scores do not change
    bank_storage = loaded.memory_bank.data_ptr()
    loaded.double().float()
    assert loaded.memory_bank.dtype == torch.float16 and loaded.memory_bank.data_ptr() == bank_storage
    assert loaded.image_descriptors.dtype == torch.float32
    assert next(loaded.backbone.parameters()).dtype == torch.float32
    memory_keys = [key for key in loaded.state_dict() if key in ("memory_bank", "image_descriptors")]
    assert memory_keys == ["memory_bank", "image_descriptors"]  # the saved order is kept
    torch.testing.assert_close(loaded.score(query)[1], loaded_scores)
    loaded.to(torch.bfloat16)
    assert loaded.memory_bank.dtype == torch.float16 and loaded.image_descriptors.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="a dense memory needs image descriptors"):
        dense.set_memory_bank(dense.memory_bank)
    with pytest.raises(ValueError, match="a dense memory of 3 images cannot hold 80 patches"):
        dense.set_memory_bank(dense.memory_bank, dense.image_descriptors[:3])
    with pytest.raises(ValueError, match="neighbour_images must be a positive integer or None; got -1"):
        PatchMemoryScorer.from_backbone(backbone, neighbour_images=-1, **kwargs)
