"""The multi-task anomaly learner: heads and maps, MoE balancing loss, synthetic anomalies, training, save / load,
normal-only standardisation, and the Accelerate training entry point with exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cadmtl.anomaly.learner import (
    DEFAULT_TASKS,
    AnomalyLearner,
    AnomalyLearnerConfig,
    TaskMoE,
    choose_task_weights,
    fuse_task_maps,
    image_scores,
    images_to_uint8,
    inpaint_pattern,
    load_balancing_loss,
    make_proxy_batch,
    normalize,
    rotate_cells,
    rotation_pattern,
    synthesize_anomalies,
)
from cadmtl.training.launch import reset_accelerate_state

SIZE = 32


def small_config(**kwargs) -> AnomalyLearnerConfig:
    settings = {"image_size": SIZE, "cell_size": 16, "channels": [8, 16, 32], "expert_hidden": 32, **kwargs}
    return AnomalyLearnerConfig(**settings)


def normal_uint8(count: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """A shared smooth striped texture plus a little noise, (count, 3, size, size) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    texture = 128 + 50 * np.sin(x / 3.0) + 30 * np.cos(y / 5.0)
    images = texture[None, None] + rng.normal(0, 4, (count, 3, size, size))
    return torch.from_numpy(np.clip(images, 0, 255).round().astype(np.uint8))


def two_step_run(repo, output_dir) -> list[str]:
    """`cadmtl anomaly train` arguments of a 2-step run at 32 px on a demo repo's exterior_ad (4 held-out images)."""
    return [
        str(repo),
        "--config",
        "exterior_ad",
        "--output-dir",
        str(output_dir),
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--held-out-images",
        "4",
        "--max-steps",
        "2",
        "--mixed-precision",
        "no",
    ]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> AnomalyLearner:
    torch.manual_seed(0)
    return AnomalyLearner(small_config()).eval()


def test_every_head_and_map_has_its_shape(model):
    inputs = torch.randn(2, 4, SIZE, SIZE)
    with torch.no_grad():
        assert model.run_task(inputs, "inpaint")[0].shape == (2, 3, SIZE, SIZE)
        assert model.run_task(inputs, "rotation")[0].shape == (2, 4, 2, 2)  # 4 angles per 16-px cell
        assert model.run_task(inputs, "segment")[0].shape == (2, 1, SIZE, SIZE)
    raw = model.raw_error_maps(normalize(normal_uint8(3), model.config.image_mean, model.config.image_std))
    assert set(raw) == set(DEFAULT_TASKS)
    assert all(value.shape == (3, SIZE, SIZE) and torch.isfinite(value).all() for value in raw.values())
    model.fit_normal_statistics(normalize(normal_uint8(4), model.config.image_mean, model.config.image_std))
    out = model.predict(torch.randn(2, 3, 40, 56))  # another size: resized in, maps back at 40 x 56
    assert out.anomaly_maps.shape == (2, 40, 56) and out.image_scores.shape == (2,)
    assert {task: tuple(v.shape) for task, v in out.task_maps.items()} == dict.fromkeys(
        DEFAULT_TASKS, (2, 40, 56)
    )
    assert out.is_anomalous is None and out.defect_masks is None  # no thresholds yet


def test_proxy_losses_are_finite_scalars(model):
    losses = model(make_proxy_batch(normal_uint8(4), model.config, seed=0))
    assert set(losses) == {*DEFAULT_TASKS, "moe_aux"}
    assert all(value.ndim == 0 and torch.isfinite(value) for value in losses.values())


def test_load_balancing_loss_on_a_hand_made_routing():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    top1 = probs.topk(1, dim=-1).indices  # experts 0, 0, 1, 0
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    assert load_balancing_loss(probs, top1, 2).item() == pytest.approx(1.15)
    # top-2 of 2 experts uses both for every token: f = (1/2, 1/2), the balanced value 1 whatever P is
    assert load_balancing_loss(probs, probs.topk(2, dim=-1).indices, 2).item() == pytest.approx(1.0)
    # everything on one expert with probability 1: the maximum E
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 5)
    assert load_balancing_loss(collapsed, torch.zeros(5, 1, dtype=torch.long), 3).item() == pytest.approx(3.0)


def test_moe_routes_per_task_with_top_k():
    torch.manual_seed(0)
    moe = TaskMoE(dim=8, hidden=16, num_experts=4, top_k=2, tasks=["a", "b"])
    x = torch.randn(2, 8, 3, 3)
    out_a, aux, probs = moe(x, "a")
    out_b, _, _ = moe(x, "b")
    assert out_a.shape == x.shape and probs.shape == (18, 4) and aux.ndim == 0
    assert not torch.allclose(out_a, out_b)  # each task has its own gate


def test_cell_patterns_cover_every_pixel_and_rotations_invert():
    masks = inpaint_pattern(4, 8, torch.arange(4))  # (4, 1, 32, 32)
    assert torch.equal(masks.sum(0), torch.ones(1, 32, 32))
    labels = torch.stack([rotation_pattern(4, phase)[0] for phase in range(4)])  # each cell sees 0..3 once
    assert torch.equal(labels.sort(0).values, torch.arange(4).view(4, 1, 1).expand(4, 4, 4))
    pixels = torch.randn(2, 3, 32, 32)
    turned = torch.randint(0, 4, (2, 4, 4))
    back = rotate_cells(rotate_cells(pixels, turned, 8), (4 - turned) % 4, 8)
    assert torch.equal(back, pixels)
    assert torch.equal(rotate_cells(pixels, torch.zeros(2, 4, 4, dtype=torch.long), 8), pixels)


def test_synthetic_anomaly_masks_are_exactly_the_changed_pixels():
    images = normal_uint8(12, size=64)
    out, masks = synthesize_anomalies(images, np.random.default_rng(3), probability=1.0, min_change=12)
    assert masks.dtype == torch.bool and masks.shape == (12, 64, 64)
    assert torch.equal(masks, (out != images).any(1))
    change = (out.short() - images.short()).abs().amax(1)
    assert (change[masks] >= 12).all()
    assert masks.flatten(1).any(1).sum() >= 10  # (almost) every image got an anomaly
    untouched, none = synthesize_anomalies(images, np.random.default_rng(3), probability=0.0)
    assert torch.equal(untouched, images) and not none.any()
    config = small_config(image_size=64, anomaly_probability=1.0)
    batch = make_proxy_batch(images, config, seed=5)
    changed = (batch.segment_input != batch.clean).any(1)
    assert torch.equal(changed, batch.segment_mask.bool())
    again = make_proxy_batch(images, config, seed=5)
    assert torch.equal(again.segment_input, batch.segment_input)  # a function of the seed only


def test_varied_synthesis_adds_smooth_regions_thin_strokes_and_edge_damage():
    from cadmtl.anomaly.learner import edge_band, thin_strokes, uneven_brightness

    images = normal_uint8(16, size=64)
    out, masks = synthesize_anomalies(images, np.random.default_rng(0), probability=1.0, mix="varied")
    assert torch.equal(masks, (out != images).any(1)) and masks.flatten(1).any(1).sum() >= 14
    rng = np.random.default_rng(1)
    flat = torch.full((3, 64, 64), 100.0)
    strokes = thin_strokes(flat, rng)
    changed = (strokes != flat).any(0)
    assert 0 < changed.float().mean() < 0.15  # thin lines, not blobs
    smooth = uneven_brightness(flat, rng)
    assert (smooth - flat).abs().amax() >= 15 and (smooth != flat).any(0).float().mean() > 0.05
    band = edge_band(64, rng)
    rows, cols = band.nonzero(as_tuple=True)
    assert {0, 63} & {int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())}  # touches a side
    assert band.float().mean() <= 0.21
    with pytest.raises(ValueError, match="synthesis mix must be one of"):
        synthesize_anomalies(images, rng, mix="draem")
    config = small_config(image_size=64, anomaly_probability=1.0)
    batch = make_proxy_batch(images, config, seed=5, synthesis="varied")
    assert torch.equal((batch.segment_input != batch.clean).any(1), batch.segment_mask.bool())


def test_a_few_steps_reduce_each_proxy_loss():
    torch.manual_seed(0)
    config = small_config(anomaly_probability=1.0)
    learner = AnomalyLearner(config)
    batch = make_proxy_batch(normal_uint8(8), config, seed=1)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        losses = learner(batch)
        first = first or {task: losses[task].item() for task in DEFAULT_TASKS}
        optimizer.zero_grad()
        (sum(losses[task] for task in DEFAULT_TASKS) + 0.01 * losses["moe_aux"]).backward()
        optimizer.step()
    with torch.no_grad():
        last = {task: float(value) for task, value in learner(batch).items()}
    for task in DEFAULT_TASKS:
        assert last[task] < 0.8 * first[task], (task, first[task], last[task])


def test_save_and_load_give_identical_maps_and_thresholds(model, tmp_path):
    config = model.config
    model.fit_normal_statistics(normalize(normal_uint8(4), config.image_mean, config.image_std))
    model.config.image_threshold, model.config.pixel_threshold = 1.5, 2.5
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "learner_cadmtl_anomaly.py",
    }
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["image_threshold"] == 1.5 and saved["architectures"] == ["AnomalyLearnerModel"]
    weights = load_file(tmp_path / "model.safetensors")  # the normal statistics are buffers of the weights
    assert {f"{task}_{key}" for task in DEFAULT_TASKS for key in ("location", "scale")} <= set(weights)
    assert int(weights["normal_statistics_images"]) == 4
    restored = AnomalyLearner.from_pretrained(tmp_path)
    pixels = torch.randn(3, 3, SIZE, SIZE)
    a, b = model.predict(pixels), restored.predict(pixels)
    assert torch.equal(a.anomaly_maps, b.anomaly_maps) and torch.equal(a.image_scores, b.image_scores)
    assert all(torch.equal(a.task_maps[t], b.task_maps[t]) for t in DEFAULT_TASKS)
    assert torch.equal(a.is_anomalous, b.is_anomalous) and torch.equal(a.defect_masks, b.defect_masks)

    # The earlier layout (statistics in normal_statistics.safetensors, not in the weights) still loads.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    config.save_pretrained(legacy)
    statistics = {k: v for k, v in weights.items() if k.endswith(("_location", "_scale"))}
    save_file(
        {k: v for k, v in weights.items() if k not in statistics and k != "normal_statistics_images"},
        legacy / "model.safetensors",
    )
    save_file(
        {k.replace("_location", ".location").replace("_scale", ".scale"): v for k, v in statistics.items()},
        legacy / "normal_statistics.safetensors",
    )
    assert torch.equal(AnomalyLearner.from_pretrained(legacy).predict(pixels).anomaly_maps, a.anomaly_maps)
    model.config.image_threshold = model.config.pixel_threshold = None


def spot_maps(spot_on: list[bool], level: float, seed: int) -> torch.Tensor:
    """(N, 16, 16) maps of small noise, plus a 4 x 4 spot of `level` on the images flagged in `spot_on`."""
    maps = torch.from_numpy(
        np.random.default_rng(seed).normal(0, 0.1, (len(spot_on), 16, 16)).astype(np.float32)
    )
    maps[torch.tensor(spot_on), 4:8, 4:8] += level
    return maps


def test_fusion_rules_weight_tasks_by_what_separates():
    anomalous = [False] * 4 + [True] * 4
    maps = {
        "segment": spot_maps(anomalous, 5.0, 0),  # lights up the anomalous images: AUROC 1
        "rotation": spot_maps([not a for a in anomalous], 5.0, 1),  # lights up the normal ones: AUROC 0
    }
    assert choose_task_weights(maps, anomalous, "mean") is None
    assert choose_task_weights(maps, anomalous, "auroc") == {"segment": 1.0, "rotation": 0.0}
    assert choose_task_weights(maps, anomalous, "select") == {"segment": 1.0, "rotation": 0.0}
    # Normal images only: 1 / variance of each task's normal image scores (here rotation's normals spread more).
    weights = choose_task_weights(maps, anomalous, "normal_variance")
    normal = torch.tensor([not a for a in anomalous])
    inverse = {t: 1 / float(image_scores(m[normal]).double().var()) for t, m in maps.items()}
    expected = {t: v / sum(inverse.values()) for t, v in inverse.items()}
    assert weights.keys() == expected.keys()
    for task in expected:
        assert weights[task] == pytest.approx(expected[task], rel=1e-5)
    assert weights["segment"] > weights["rotation"]
    assert choose_task_weights(
        {t: m[normal] for t, m in maps.items()}, None, "normal_variance"
    ) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="needs anomalous and normal images"):
        choose_task_weights(maps, [False] * 8, "select")
    with pytest.raises(ValueError, match="fusion must be one of"):
        choose_task_weights(maps, anomalous, "vote")


def test_weighted_fusion_in_config_predict_and_save(model, tmp_path):
    a, b = torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 6.0)
    assert torch.equal(fuse_task_maps({"x": a, "y": b}, None), torch.full((1, 2, 2), 4.0))
    assert torch.equal(fuse_task_maps({"x": a, "y": b}, {"x": 0.75, "y": 0.25}), torch.full((1, 2, 2), 3.0))
    # A task at weight 0 is left out entirely (even a non-finite map of it).
    assert torch.equal(fuse_task_maps({"x": a, "y": b * float("nan")}, {"x": 1.0, "y": 0.0}), a)
    config = small_config(task_weights={"segment": 2, "inpaint": 0, "rotation": 2}, fusion="select")
    assert config.task_weights == {"inpaint": 0.0, "rotation": 0.5, "segment": 0.5}
    for bad, message in (
        ({"depth": 1.0}, "does not have"),
        ({"segment": -1.0}, ">= 0"),
        ({"segment": 0}, "not all 0"),
    ):
        with pytest.raises(ValueError, match=message):
            small_config(task_weights=bad)
    learner = model
    cfg = learner.config
    learner.fit_normal_statistics(normalize(normal_uint8(4), cfg.image_mean, cfg.image_std))
    pixels = torch.randn(2, 3, SIZE, SIZE)
    cfg.task_weights, cfg.fusion = {"inpaint": 0.0, "rotation": 0.25, "segment": 0.75}, "auroc"
    out = learner.predict(pixels)
    expected = 0.25 * out.task_maps["rotation"] + 0.75 * out.task_maps["segment"]
    torch.testing.assert_close(out.anomaly_maps, expected)
    torch.testing.assert_close(out.image_scores, image_scores(expected))
    learner.save_pretrained(tmp_path)
    restored = AnomalyLearner.from_pretrained(tmp_path)
    assert restored.config.task_weights == cfg.task_weights and restored.config.fusion == "auroc"
    assert torch.equal(restored.predict(pixels).anomaly_maps, out.anomaly_maps)
    cfg.task_weights, cfg.fusion = None, "mean"


@pytest.mark.parametrize("standardization", ["global", "pixel"])
def test_standardisation_uses_normal_statistics_only(standardization):
    torch.manual_seed(0)
    learner = AnomalyLearner(small_config(standardization=standardization)).eval()
    config = learner.config
    learner.fit_normal_statistics(normalize(normal_uint8(16, seed=1), config.image_mean, config.image_std))
    normal = normalize(normal_uint8(4, seed=2), config.image_mean, config.image_std)
    fused = learner.predict(normal).anomaly_maps
    assert abs(fused.mean().item()) < 0.5  # a fresh normal image sits near 0
    # No per-image or per-batch normalisation: an image's map does not depend on what it is scored with.
    anomalous = normal.clone()
    anomalous[:, :, 8:20, 8:20] = 3.0
    alone = learner.predict(normal[:1])
    beside = learner.predict(torch.cat([normal[:1], anomalous[1:]]))
    for task in (
        DEFAULT_TASKS
    ):  # equal up to the float noise of batched convolutions, amplified by small normal scales
        torch.testing.assert_close(alone.raw_task_maps[task][0], beside.raw_task_maps[task][0])
    scale = alone.anomaly_maps.abs().max().item()
    torch.testing.assert_close(alone.anomaly_maps[0], beside.anomaly_maps[0], rtol=1e-3, atol=1e-3 * scale)
    assert learner.predict(anomalous).anomaly_maps[:, 8:20, 8:20].mean() > fused[:, 8:20, 8:20].mean()


@pytest.mark.slow
def test_main_trains_calibrates_and_resumes_exactly(tmp_path, fresh_accelerate_state):
    from cadmtl.anomaly.learner_training import default_tasks, main, train
    from dataset_scripts.make_demo import build_demo_dataset

    repo = tmp_path / "repo"
    build_demo_dataset(
        repo, train=20, validation=6, test=6, configs=["chassis_cls"], ad_configs=["exterior_ad"]
    )
    common = [
        str(repo),
        "--config",
        "exterior_ad",
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--held-out-images",
        "6",
        "--max-steps",
        "6",
        "--coba-every",
        "1",
        "--coba-warmup-steps",
        "3",
        "--coba-history-length",
        "5",
        "--mixed-precision",
        "no",
        "--logging-steps",
        "2",
    ]
    full = tmp_path / "full"
    summary = train(
        [
            *common,
            "--output-dir",
            str(full),
            "--save-every",
            "3",
            "--eval-split",
            "test",
            "--fusion",
            "select",
        ]
    )
    reset_accelerate_state()
    assert summary["fusion"]["method"] == "select" and summary["fusion"]["images"] == "validation (6 images)"
    assert sum(summary["fusion"]["weights"].values()) == pytest.approx(1.0)
    # the default tasks: distill too where the `pretrained` extra is installed (the test extras install it)
    assert summary["tasks"] == default_tasks("efficientnet-lite0") == list(summary["weights"])
    assert len(set(summary["weights"].values())) == len(summary["tasks"])  # CoBa moved them: part of resume
    assert summary["steps"] == 6 and summary["calibration"]["method"] == "f1_max:validation"
    assert {"image_auroc", "pixel_auroc", "aupro", "seconds_per_image"} <= set(summary["evaluation"])
    records = [json.loads(line) for line in (full / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6] and "coba/weight/segment" in records[-1]
    assert (full / "checkpoints" / "step_3").is_dir()
    learner = AnomalyLearner.from_pretrained(full / "model")
    assert learner.config.image_threshold is not None and learner.normal_statistics
    assert learner.config.fusion == "select" and learner.config.task_weights == summary["fusion"]["weights"]

    # Interrupted after step 3: a new run resumes from that checkpoint and must end on the same weights.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(full / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    assert main([*common, "--output-dir", str(resumed), "--resume-from-checkpoint", "latest"]) == 0
    reset_accelerate_state()
    expected, got = (
        load_file(full / "model" / "model.safetensors"),
        load_file(resumed / "model" / "model.safetensors"),
    )
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    resumed_summary = json.loads((resumed / "results.json").read_text())
    assert resumed_summary["weights"] == summary["weights"]
    # The default fusion needs normal images only: the validation split's 3 normal images here.
    assert resumed_summary["fusion"]["method"] == "normal_variance"
    assert resumed_summary["fusion"]["images"] == "validation (3 images)"


def test_tile_crops_cut_each_image_into_the_processor_tiles():
    from PIL import Image

    from cadmtl.anomaly.learner import tile_crops
    from modeling_cadmtl_anomaly.features_cadmtl_anomaly import tile_boxes

    wide, small = Image.new("RGB", (200, 90)), Image.new("RGB", (40, 30))
    wide.putpixel((199, 89), (255, 0, 0))
    crops = tile_crops([wide, small], 64, 16)
    boxes = tile_boxes(90, 200, 64, 16)
    assert len(crops) == len(boxes) + 1  # the small image is one tile: itself
    assert [c.size for c in crops[: len(boxes)]] == [(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes]
    assert crops[len(boxes) - 1].getpixel((63, 63)) == (255, 0, 0)  # the last tile ends at the corner
    assert crops[-1].size == (40, 30)
    assert tile_crops([wide, small], None) == [wide, small]


def test_tile_settings_of_the_learner_config_round_trip_and_are_checked(tmp_path):
    config = small_config(tile_size=64, tile_overlap=16)
    config.save_pretrained(tmp_path)
    loaded = AnomalyLearnerConfig.from_pretrained(tmp_path)
    assert (loaded.tile_size, loaded.tile_overlap) == (64, 16)
    assert (small_config().tile_size, small_config().tile_overlap) == (None, 0)
    with pytest.raises(ValueError, match="tile-overlap"):
        small_config(tile_size=64, tile_overlap=64)


def test_train_options_refuse_bad_tile_settings(capsys):
    from cadmtl.anomaly.learner_training import parse_args

    base = ["repo", "--config", "tile_ad", "--output-dir", "out"]
    args = parse_args([*base, "--tile-size", "128", "--tile-overlap", "32"])
    assert (args.tile_size, args.tile_overlap) == (128, 32)
    for extra, message in [
        (["--tile-overlap", "8"], "needs --tile-size"),
        (["--tile-size", "16"], "at least 32"),
        (["--tile-size", "128", "--fusion", "auroc"], "--fusion auroc weighs whole validation images"),
    ]:
        with pytest.raises(SystemExit):
            parse_args([*base, *extra])
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_main_trains_on_tiles_and_scores_by_tiles(tmp_path, fresh_accelerate_state):
    from cadmtl.anomaly.data import load_anomaly_split
    from cadmtl.anomaly.learner_training import carve_held_out, scores_and_maps, train
    from cadmtl.anomaly.models import anomaly_processor, score_images
    from dataset_scripts.make_demo import build_demo_dataset
    from modeling_cadmtl_anomaly.features_cadmtl_anomaly import tile_boxes

    repo = tmp_path / "repo"
    build_demo_dataset(
        repo, train=12, validation=6, test=6, configs=["chassis_cls"], ad_configs=["exterior_ad"]
    )
    train_samples = load_anomaly_split(str(repo), "exterior_ad", "train")
    height, width = train_samples[0].size
    tile, overlap = min(height, width) // 2, 8
    summary = train(
        [
            *two_step_run(repo, tmp_path / "run"),
            "--tile-size",
            str(tile),
            "--tile-overlap",
            str(overlap),
            "--eval-split",
            "test",
        ]
    )
    reset_accelerate_state()
    tiles_per_image = [len(tile_boxes(*s.size, tile, overlap)) for s in train_samples]
    assert min(tiles_per_image) >= 4
    train_index, _ = carve_held_out(len(train_samples), 4)
    train_tiles = sum(tiles_per_image[i] for i in train_index)
    assert summary["tiles"] == {"tile_size": tile, "tile_overlap": overlap, "train_tiles": train_tiles}
    assert summary["fusion"]["method"] == "normal_variance" and "tiles)" in summary["fusion"]["images"]
    assert summary["calibration"]["method"] == "f1_max:validation"
    assert {"image_auroc", "pixel_auroc", "aupro"} <= set(summary["evaluation"])

    learner = AnomalyLearner.from_pretrained(tmp_path / "run" / "model")
    assert (learner.config.tile_size, learner.config.tile_overlap) == (tile, overlap)
    processor = anomaly_processor(learner)
    assert processor.tile_size == tile  # evaluate, predict and the app tile as it was trained
    test = load_anomaly_split(str(repo), "exterior_ad", "test")
    scores, maps = scores_and_maps(learner, [s.image for s in test])
    expected_scores, expected_maps = score_images(learner, [s.image for s in test], processor)
    assert scores == pytest.approx(expected_scores)
    for sample, amap, expected in zip(test, maps, expected_maps):
        assert tuple(amap.shape) == sample.size
        np.testing.assert_allclose(amap.numpy(), expected, rtol=1e-5, atol=1e-5)
    # One tile's map is the model's map of that crop: the stitched map is not the whole image squashed.
    squashed = learner.predict(
        normalize(images_to_uint8([test[0].image], 32), learner.config.image_mean, learner.config.image_std)
    )
    assert float(squashed.image_scores[0]) != pytest.approx(scores[0])
