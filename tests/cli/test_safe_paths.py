"""Files named from data stay inside the output folder: the one rule (`dataset_scripts.safe_paths`) and every writer
of the product run on hostile ids (`../../evil`, `/abs/evil`, `a/../../evil`, `C:\\evil`, `evil\\x00.png`)."""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_scripts.safe_paths import (
    HASH_CHARS,
    MAX_SEGMENT_BYTES,
    SafeOutputPaths,
    name_hash,
    safe_file_name,
    safe_output_path,
    safe_relative_path,
)

EVIL_IDS = ["../../evil", "/abs/evil", "a/../../evil", "C:\\evil", "evil\x00.png"]


# ------------------------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../evil", "evil"),
        ("/abs/evil", "abs/evil"),
        ("a/../../evil", "a/evil"),
        ("C:\\evil", "C_/evil"),
        ("evil\x00.png", "evil_.png"),
        ("..\\..\\evil", "evil"),
        ("CON", "CON_"),
        ("..", "_"),
        ("", "_"),
        ("a//b/./c ", "a/b/c"),
    ],
)
def test_hostile_ids_are_encoded_inside_with_the_hash_of_the_id(name: str, expected: str) -> None:
    assert safe_relative_path(name, ".npy") == PurePosixPath(f"{expected}~{name_hash(name)}.npy")
    path = safe_output_path("OUT/maps", name, ".npy")
    assert path.parts[:2] == ("OUT", "maps") and ".." not in path.parts
    assert not any(ord(c) < 32 or c in '\\:<>"|?*' for c in str(path))


@pytest.mark.parametrize("name", ["test/crack/000", "train/good/007.jpg", "exterior-12", "ドア/傷 1", 42])
def test_ordinary_ids_keep_exactly_their_name_and_folders(name: str | int) -> None:
    assert safe_output_path("OUT", name, ".png") == Path("OUT", f"{name}.png")


def test_different_ids_never_share_a_file() -> None:
    names = [*EVIL_IDS, "evil", "abs/evil", "a/evil", "C_/evil", "evil_.png", "../evil", "./evil"]
    paths = [safe_relative_path(name) for name in names]
    assert len(set(paths)) == len(names)
    assert name_hash("../../evil") == name_hash("../../evil") and len(name_hash("x")) == HASH_CHARS


def test_over_long_names_are_cut_and_hash_suffixed() -> None:
    first, second = "x" * 300, "x" * 299 + "y"
    for name in (first, second, "é" * 300):
        (part,) = safe_relative_path(name, ".png").parts
        assert len(part.encode()) <= MAX_SEGMENT_BYTES and part.endswith(f"~{name_hash(name)}.png")
    assert safe_relative_path(first) != safe_relative_path(second)
    deep = safe_relative_path("d" * 400 + "/leaf")
    assert all(len(part.encode()) <= MAX_SEGMENT_BYTES for part in deep.parts)


def test_a_file_name_never_makes_folders() -> None:
    assert safe_file_name("dent", ".png") == "dent.png"
    assert safe_file_name("../../evil", ".png") == f".._.._evil~{name_hash('../../evil')}.png"
    assert safe_file_name("a/b") != safe_file_name("a_b") == "a_b"
    assert "/" not in safe_file_name("/abs/evil") and "\\" not in safe_file_name("C:\\evil")


def test_the_writer_memory_tells_ids_apart_even_by_letter_case() -> None:
    paths = SafeOutputPaths("OUT", ".png")
    assert paths("Img") == Path("OUT/Img.png") == paths("Img")  # the same id: the same file
    assert paths("img") == Path(f"OUT/img~{name_hash('img')}.png")  # one file on macOS / Windows
    crafted = f"evil~{name_hash('../../evil')}"  # an id equal to another id's encoded form
    assert paths("../../evil") != paths(crafted)


# ------------------------------------------------------------------------------------------------ the writers
def _files(root: Path) -> set[Path]:
    return {Path(folder, name) for folder, _, names in os.walk(root) for name in names}


def _assert_written_inside(tmp_path: Path, before: set[Path], out: Path) -> set[Path]:
    """Every file the writer added under tmp_path is inside `out`, and none went to the absolute ids."""
    new = _files(tmp_path) - before
    outside = sorted(str(path) for path in new if not path.resolve().is_relative_to(out.resolve()))
    assert not outside, f"written outside {out}: {outside}"
    assert not Path("/abs/evil").exists() and not any(Path("/abs").glob("evil*"))
    return new


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """Deep enough that `../../evil` would land in tmp_path, where the walk sees it."""
    return tmp_path / "runs" / "deep" / "out"


def _noise(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def anomaly_model(tmp_path_factory) -> Path:
    from cadmtl.anomaly.data import to_pixel_values
    from cadmtl.anomaly.patch_memory import PatchMemoryScorer
    from cadmtl.features import load_backbone

    scorer = PatchMemoryScorer.from_backbone(
        load_backbone("tiny", 0)[0], coreset_fraction=0.5, image_size=(32, 32)
    )
    scorer.fit(to_pixel_values([_noise(i) for i in range(3)], (32, 32)))
    scorer.image_threshold, scorer.pixel_threshold = 1.0, 1.0
    folder = tmp_path_factory.mktemp("anomaly") / "model"
    scorer.save_pretrained(folder)
    return folder


def test_anomaly_evaluate_keeps_maps_and_pictures_inside(anomaly_model, out, tmp_path, monkeypatch) -> None:
    from cadmtl.anomaly import command
    from cadmtl.anomaly.data import AnomalySample

    samples = []
    for index, image_id in enumerate(EVIL_IDS):
        mask = np.zeros((40, 48), np.uint8)
        mask[5:15, 5:15] = index % 2
        samples.append(AnomalySample(image_id, _noise(10 + index), mask, index % 2 == 0, "dent"))
    monkeypatch.setattr(command, "load_anomaly_split", lambda *args, **kwargs: samples)
    before = _files(tmp_path)
    argv = [str(anomaly_model), "repo", "--config", "x_ad", "--output-dir", str(out)]
    assert command.evaluate_main([*argv, "--save-maps", "--save-pictures", "--batch-size", "2"]) == 0
    new = _assert_written_inside(tmp_path, before, out)
    assert len([p for p in new if p.suffix == ".npy"]) == len([p for p in new if p.suffix == ".png"]) == 5
    for sample in samples:  # each map is at the rule's name, at the image's size
        assert np.load(safe_output_path(out / "maps", sample.image_id, ".npy")).shape == (40, 48)
        assert safe_output_path(out / "pictures", sample.image_id, ".png").is_file()


def test_anomaly_predict_keeps_its_pictures_inside(anomaly_model, out, tmp_path) -> None:
    from cadmtl.cli import main

    inputs = tmp_path / "inputs"
    (inputs / "sub").mkdir(parents=True)
    for index, name in enumerate(["C:\\evil.png", "..evil.png", "sub/part.png", " lead.png"]):
        _noise(index).save(inputs / name)
    before = _files(tmp_path)
    assert main(["anomaly", "predict", str(anomaly_model), str(inputs), "--output-dir", str(out)]) == 0
    new = _assert_written_inside(tmp_path, before, out)
    assert len([p for p in new if p.suffix == ".png"]) == 4 and out / "sub" / "part.png" in new


def _pair(pair_id: str, index: int, anomalous: bool):
    from cadmtl.reference.pairs import Pair

    reference = _noise(100 + index, (32, 32))
    query = np.asarray(reference).copy()
    mask = np.zeros((32, 32), np.uint8)
    if anomalous:
        query[8:16, 8:16] = 255
        mask[8:16, 8:16] = 1
    box = [8.0, 8.0, 16.0, 16.0] if anomalous else [0.0, 0.0, 0.0, 0.0]
    return Pair(
        pair_id, f"q{index}", f"r{index}", reference, Image.fromarray(query), box, [box] if anomalous else [],
        mask, anomalous, "door", "dent", "synthetic", "none", {},
    )  # fmt: skip


def test_reference_localize_keeps_maps_and_overlays_inside(out, tmp_path, monkeypatch) -> None:
    from cadmtl.reference import evaluate, localize_pairs

    splits = {
        "validation": [_pair(f"v{i}", i, i % 2 == 0) for i in range(4)],
        "test": [_pair(pair_id, 10 + i, i % 2 == 0) for i, pair_id in enumerate(EVIL_IDS)],
    }
    monkeypatch.setattr(localize_pairs, "load_pairs", lambda repo, split, **kwargs: iter(splits[split]))
    monkeypatch.setattr(evaluate, "load_pairs", lambda repo, split, **kwargs: iter(splits[split]))
    before = _files(tmp_path)
    argv = ["tiny", "pairs", "--split", "test", "--output-dir", str(out), "--image-size", "32"]
    assert localize_pairs.main([*argv, "--window", "1", "--save-maps", "--overlays", "-1"]) == 0
    new = _assert_written_inside(tmp_path, before, out)
    assert len([p for p in new if p.suffix == ".npy"]) == len([p for p in new if p.suffix == ".png"]) == 5
    results = evaluate.evaluate(out, "pairs", "test")  # finds the maps under the names localize gave
    assert results["metrics"]["pixel_auroc"] is not None


def test_predict_crops_named_after_hostile_class_names_stay_inside(out, tmp_path) -> None:
    from cadmtl.pictures.predict import predict_files
    from cadmtl.testing import tiny_cadmtl_config
    from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

    torch.manual_seed(0)
    model = CadMtlModel(tiny_cadmtl_config("vit", det_labels=["dent", "../../evil"])).eval()
    with torch.no_grad():  # every location a confident "../../evil" box
        model.det_head.cls_logits.bias.copy_(torch.tensor([-20.0, 20.0]))
        model.det_head.centerness.bias.fill_(20.0)
        model.det_head.box_distances.bias.fill_(1.0)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir, image_processor=CadMtlImageProcessor(size={"height": 64, "width": 64}))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _noise(0, (48, 64)).save(inputs / "C:\\evil.png")
    before = _files(tmp_path)
    run = predict_files(model_dir, inputs, out, crops=True, device="cpu")
    new = _assert_written_inside(tmp_path, before, out)
    assert run.crops and set(run.crops) <= new
    assert run.crops[0].name == f"0_.._.._evil~{name_hash('0_../../evil')}.png"


@pytest.mark.filterwarnings("ignore:Glyph 0")  # the NUL of a title has no glyph
def test_charts_named_after_hostile_config_names_stay_inside(out, tmp_path) -> None:
    from cadmtl.pictures.charts import plot_evaluation

    report = {
        "per_class": {"dent": {"acc@1": 0.5, "support": 2}, "normal": {"acc@1": 1.0, "support": 2}},
        "label_names": ["normal", "dent"],
        "confusion_matrix": [[2, 0], [1, 1]],
    }
    results = {name: {"task": "cls", "split": "test", "report": report} for name in EVIL_IDS}
    source = tmp_path / "eval_results.json"
    source.write_text(json.dumps({"results": results}))
    before = _files(tmp_path)
    written = plot_evaluation(source, out)
    new = _assert_written_inside(tmp_path, before, out)
    assert len(written) == len(new) == 2 * len(EVIL_IDS) and all(p.parent == out for p in written)


def test_conversion_reports_named_after_hostile_splits_stay_inside(out, tmp_path) -> None:
    from dataset_scripts.report import ValidationReport, load_reports

    before = _files(tmp_path)
    for split in EVIL_IDS:
        ValidationReport("../../evil_det", split).save(out)
    new = _assert_written_inside(tmp_path, before, out)
    assert len(new) == 2 * len(EVIL_IDS)
    assert {split for _, split in load_reports(out)} == set(EVIL_IDS)  # read back from the JSON, not the name


def test_coco_conversion_of_hostile_file_names_writes_only_inside(out, tmp_path) -> None:
    from dataset_scripts.convert import main as convert

    source = tmp_path / "coco"
    source.mkdir()
    _noise(0).save(source / "good.png")
    images = [{"id": 1, "file_name": "good.png", "width": 48, "height": 40}]
    images += [{"id": 2 + i, "file_name": name, "width": 48, "height": 40} for i, name in enumerate(EVIL_IDS)]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]}]
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "dent"}]}
    (source / "annotations.json").write_text(json.dumps(coco))
    before = _files(tmp_path)
    mapping = _mapping(tmp_path)
    argv = [
        str(source / "annotations.json"),
        "--output-dir",
        str(out),
        "--config",
        "plant_det",
        "--no-progress",
    ]
    assert convert(["coco", *argv, "--mapping", str(mapping)]) == 0
    new = _assert_written_inside(tmp_path, before | {mapping}, out)
    assert any(p.suffix == ".parquet" for p in new)
    report = json.loads((out / "reports" / "plant_det" / "train.json").read_text())
    assert report["counts"] == {"unsafe_path": 4, "missing_file": 1}  # `C:\evil` is a plain name on Linux
    assert report["rows_seen"] == 6 and report["rows_written"] == 1  # every image the JSON lists was seen


def _mapping(tmp_path: Path) -> Path:
    path = tmp_path / "mapping.yaml"
    path.write_text("dent: dent\n")
    return path
