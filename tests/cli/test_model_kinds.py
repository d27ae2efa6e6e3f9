"""Model kinds are checked on load: every command given a model of another kind, a missing folder or a folder
without (or with mismatched) weights exits 2 with one line naming the folder, what it holds and which command serves
it; only `owner/name` goes to the Hub; `cadmtl anomaly train` runs on the demo split with its defaults."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import DINOv3ViTModel

from cadmtl.anomaly.data import to_pixel_values
from cadmtl.anomaly.learner import AnomalyLearner, AnomalyLearnerConfig
from cadmtl.anomaly.models import ANOMALY_MODELS, load_anomaly_model
from cadmtl.anomaly.patch_memory import PatchMemoryScorer
from cadmtl.cli import main as cadmtl
from cadmtl.features import backbone_from_config
from cadmtl.model_kinds import (
    ANOMALY_LEARNER,
    BACKBONE,
    CADMTL,
    LOCALIZER,
    NO_MODEL,
    NO_WEIGHTS,
    PATCH_MEMORY,
    ModelLoadError,
    inspect_model,
    load_pretrained,
)
from cadmtl.pictures.predict import Predictor
from cadmtl.testing import tiny_cadmtl_config, tiny_vit_config
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

REPO_ROOT = Path(__file__).resolve().parents[2]
CADMTL_WANTED = "a CadMtl multi-task model"
ANOMALY_WANTED = "a patch-memory anomaly scorer or an anomaly learner"
EXPORT_WANTED = (
    "a CadMtl multi-task model, a patch-memory anomaly scorer, an anomaly learner or a reference localiser"
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """One tiny saved folder of each kind (and two that hold no model)."""
    root = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    CadMtlModel(tiny_cadmtl_config()).save_pretrained(
        root / "cadmtl", image_processor=CadMtlImageProcessor(size={"height": 64, "width": 64})
    )
    scorer = PatchMemoryScorer.from_backbone(
        backbone_from_config(tiny_vit_config()), layers=[1, 2], image_size=(32, 32)
    )
    scorer.fit(torch.randn(2, 3, 32, 32), few_shot=True)
    scorer.save_pretrained(root / "scorer")
    learner = AnomalyLearner(AnomalyLearnerConfig(preset="tiny", image_size=32)).eval()
    learner.fit_normal_statistics([torch.randn(2, 3, 32, 32)])
    learner.save_pretrained(root / "learner")
    (root / "localizer").mkdir()
    (root / "localizer" / "localizer.json").write_text(
        json.dumps({"model": "tiny", "layers": [2], "image_size": 32, "localizer": {"threshold": 1.0}})
    )
    DINOv3ViTModel(tiny_vit_config()).save_pretrained(root / "backbone")
    (root / "no-weights").mkdir()
    (root / "no-weights" / "config.json").write_text(tiny_cadmtl_config().to_json_string())
    (root / "empty").mkdir()
    return {path.name: path for path in root.iterdir()}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "part.png"
    Image.fromarray(np.full((40, 48, 3), 120, np.uint8)).save(path)
    return path


def expected_line(folders: dict[str, Path], name: str, wanted: str) -> str:
    """The one line for folder `name` given to a command that wants `wanted` (spelled out, not built by the code)."""
    path = folders[name]
    holds = {
        "cadmtl": f"a CadMtl multi-task model, not {wanted}; use `cadmtl predict {path} IMAGES --output-dir OUT`",
        "scorer": f"a patch-memory anomaly scorer, not {wanted}; "
        f"use `cadmtl anomaly predict {path} IMAGES --output-dir OUT`",
        "learner": f"an anomaly learner, not {wanted}; use `cadmtl anomaly predict {path} IMAGES --output-dir OUT`",
        "localizer": f"a reference localiser, not {wanted}; "
        f"use `CADMTL_REFERENCE_MODEL={path} python app.py` or `cadmtl export onnx {path} OUT`",
        "backbone": f"a DINOv3 backbone, not {wanted}; fit a scorer on it with "
        f"`cadmtl anomaly fit REPO --config CONFIG --backbone {path} --output-dir OUT`",
        "no-weights": f"no model weights (a config.json without model.safetensors), not {wanted}; "
        "pass the model folder a run saved (OUTPUT_DIR/model)",
        "empty": f"no saved model (no config.json), not {wanted}; pass the model folder a run saved (OUTPUT_DIR/model)",
    }[name]
    return f"{path} holds {holds}"


def test_each_folder_is_told_by_its_files(folders: dict[str, Path]) -> None:
    kinds = {name: inspect_model(path) for name, path in folders.items()}
    assert {name: info.kind for name, info in kinds.items()} == {
        "cadmtl": CADMTL,
        "scorer": PATCH_MEMORY,
        "learner": ANOMALY_LEARNER,
        "localizer": LOCALIZER,
        "backbone": BACKBONE,
        "no-weights": NO_WEIGHTS,
        "empty": NO_MODEL,
    }
    assert kinds["backbone"].model_type == "dinov3_vit" and kinds["no-weights"].model_type == "cadmtl"
    assert inspect_model(folders["localizer"] / "localizer.json").kind is LOCALIZER
    assert (
        inspect_model(folders["scorer"] / "config.json").kind is PATCH_MEMORY
    )  # the config names its folder


def run(argv: list[str], capsys) -> tuple[int, str]:
    status = cadmtl(argv)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("name", ["scorer", "learner", "localizer", "backbone", "no-weights", "empty"])
def test_predict_and_evaluate_refuse_every_other_kind(folders, image, name, tmp_path, capsys) -> None:
    line = expected_line(folders, name, CADMTL_WANTED)
    status, err = run(
        ["predict", str(folders[name]), str(image), "--output-dir", str(tmp_path / "p")], capsys
    )
    assert (status, err) == (2, f"error: {line}\n")
    status, err = run(
        ["evaluate", str(folders[name]), str(tmp_path / "data"), "--output-dir", str(tmp_path)], capsys
    )
    assert (status, err) == (2, f"error: {line}\n")
    assert not (tmp_path / "p").exists()  # nothing was built, nothing written


@pytest.mark.parametrize("name", ["cadmtl", "localizer", "backbone", "no-weights", "empty"])
def test_anomaly_evaluate_and_predict_refuse_every_other_kind(folders, image, name, tmp_path, capsys) -> None:
    line = expected_line(folders, name, ANOMALY_WANTED)
    argv = ["anomaly", "evaluate", str(folders[name]), str(tmp_path / "data"), "--config", "exterior_ad"]
    status, err = run([*argv, "--output-dir", str(tmp_path / "e")], capsys)
    assert (status, err) == (
        2,
        f"error: {line}\n",
    )  # no longer `TypeError: cannot unpack non-iterable NoneType`
    argv = ["anomaly", "predict", str(folders[name]), str(image), "--output-dir", str(tmp_path / "p")]
    assert run(argv, capsys) == (2, f"error: {line}\n")
    with pytest.raises(ModelLoadError, match="^" + line.replace("(", r"\(").replace(")", r"\)")):
        load_anomaly_model(folders[name])


@pytest.mark.parametrize("name", ["backbone", "no-weights", "empty"])
def test_export_refuses_what_it_does_not_export(folders, name, tmp_path, capsys) -> None:
    status, err = run(["export", "onnx", str(folders[name]), str(tmp_path / "onnx")], capsys)
    assert (status, err) == (2, f"cadmtl export onnx: {expected_line(folders, name, EXPORT_WANTED)}\n")
    assert not (tmp_path / "onnx").exists()


def test_a_missing_folder_is_one_line_everywhere(tmp_path, image, capsys) -> None:
    missing = tmp_path / "outputs" / "ad" / "model"
    line = f"no such model folder: {missing}"
    out = str(tmp_path / "out")
    assert run(["predict", str(missing), str(image), "--output-dir", out], capsys) == (2, f"error: {line}\n")
    assert run(["evaluate", str(missing), "data", "--output-dir", out], capsys) == (2, f"error: {line}\n")
    argv = ["anomaly", "evaluate", str(missing), "data", "--config", "exterior_ad", "--output-dir", out]
    assert run(argv, capsys) == (2, f"error: {line}\n")
    assert run(["anomaly", "predict", str(missing), str(image), "--output-dir", out], capsys) == (
        2,
        f"error: {line}\n",
    )
    assert run(["export", "onnx", str(missing), out], capsys) == (2, f"cadmtl export onnx: {line}\n")


def test_only_owner_slash_name_goes_to_the_hub(tmp_path, image, monkeypatch, capsys) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    asked = []

    def offline_download(repo_id: str, filename: str, **kwargs) -> str:
        asked.append(repo_id)
        raise LocalEntryNotFoundError(
            f"Cannot find {filename} of {repo_id} in the local cache.\nSecond line."
        )

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_download)
    for name in ("no-such-model", "outputs/ad/model", "./owner/name", "model.safetensors"):
        argv = ["predict", name, str(image), "--output-dir", "out"]
        assert run(argv, capsys) == (2, f"error: no such model folder: {name}\n")
    assert asked == []  # a relative name that is not a folder never touches the Hub
    status, err = run(["predict", "owner/name", str(image), "--output-dir", "out"], capsys)
    assert asked == ["owner/name"] and status == 2
    assert err == (
        "error: no such model folder: owner/name, and the Hugging Face Hub gave no model owner/name "
        "(LocalEntryNotFoundError: Cannot find config.json of owner/name in the local cache.)\n"
    )


def test_weights_that_do_not_fit_are_an_error_not_a_warning(folders, image, tmp_path, capsys) -> None:
    partial = tmp_path / "partial"
    CadMtlModel(tiny_cadmtl_config()).save_pretrained(partial)
    weights = load_file(partial / "model.safetensors")
    dropped = sorted(name for name in weights if name.startswith("cls_head."))
    kept = {name: value for name, value in weights.items() if name not in dropped}
    save_file(
        {**kept, "extra.weight": torch.zeros(1)}, partial / "model.safetensors", metadata={"format": "pt"}
    )
    with pytest.raises(ModelLoadError) as caught:
        Predictor.from_pretrained(partial, "cpu")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"{partial}: the weights do not fit a CadMtl multi-task model: missing {dropped[0]}"
    )
    assert message.endswith("; unexpected extra.weight")
    status, err = run(["predict", str(partial), str(image), "--output-dir", str(tmp_path / "o")], capsys)
    assert status == 2 and err.splitlines()[-1] == f"error: {message}"  # after transformers' progress bar
    assert "LOAD REPORT" not in err and "Traceback" not in err and "MISSING" not in err

    # An anomaly model's config with a CadMtl model's weights: the anomaly loader refuses it the same way.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text((folders["scorer"] / "config.json").read_text())
    (foreign / "model.safetensors").write_bytes((folders["cadmtl"] / "model.safetensors").read_bytes())
    with pytest.raises(
        ModelLoadError, match=r"foreign: the weights do not fit a patch-memory anomaly scorer: missing "
    ):
        load_anomaly_model(foreign)


def test_the_anomaly_registry_loads_each_model_type_complete(folders) -> None:
    assert {
        "cadmtl_patch_memory": PatchMemoryScorer,
        "cadmtl_anomaly_learner": AnomalyLearner,
    } == ANOMALY_MODELS
    scorer, learner = load_anomaly_model(folders["scorer"]), load_anomaly_model(folders["learner"])
    assert type(scorer) is PatchMemoryScorer and type(learner) is AnomalyLearner
    assert not scorer.training and not learner.training
    pixels = to_pixel_values([Image.new("RGB", (32, 32), (90, 120, 150))], (32, 32))
    fresh = AnomalyLearner.from_pretrained(folders["learner"])
    torch.testing.assert_close(learner.predict(pixels).anomaly_maps, fresh.predict(pixels).anomaly_maps)
    model = load_pretrained(CadMtlModel, folders["cadmtl"], "a CadMtl multi-task model")
    assert model.config.cls_labels == tiny_cadmtl_config().cls_labels


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_the_app_shows_the_sentence_instead_of_results(folders, image) -> None:
    gradio_client = pytest.importorskip(
        "gradio_client", reason="the demo extra (gradio_client) is not installed"
    )
    offline = os.environ.get("HF_HUB_OFFLINE")
    spec = importlib.util.spec_from_file_location("cadmtl_demo_app", REPO_ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    if offline is None:  # app.py defaults it for its own process; the other tests keep the session's setting
        os.environ.pop("HF_HUB_OFFLINE", None)

    demo = app.build_demo_app(
        folders["scorer"], anomaly_model=folders["cadmtl"], reference_model=folders["learner"]
    )
    page = json.dumps(demo.config)
    inspect_line = expected_line(folders, "scorer", CADMTL_WANTED)
    anomaly_line = expected_line(folders, "cadmtl", ANOMALY_WANTED)
    reference_line = f"{folders['learner']} holds an anomaly learner, not a reference localiser; use `cadmtl anomaly predict {folders['learner']} IMAGES --output-dir OUT`"
    for line in (inspect_line, anomaly_line, reference_line):
        assert json.dumps(f"**No model served**: {line}") in page
    _, url, _ = demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True
    )
    try:
        client = gradio_client.Client(url, verbose=False)
        with pytest.raises(
            Exception, match="holds a patch-memory anomaly scorer, not a CadMtl multi-task model"
        ):
            client.predict(gradio_client.handle_file(str(image)), api_name="/predict")
        with pytest.raises(
            Exception, match="holds a CadMtl multi-task model, not a patch-memory anomaly scorer"
        ):
            client.predict(gradio_client.handle_file(str(image)), api_name="/anomaly")
    finally:
        demo.close()


# ------------------------------------------------------------------------------------- anomaly train's split
def test_the_held_out_share_shrinks_to_a_quarter_when_it_leaves_too_few_to_train() -> None:
    from cadmtl.anomaly.learner_training import carve_held_out, held_out_count

    assert held_out_count(48, 64) == 12 and held_out_count(48, 24) == 24 and held_out_count(200, 64) == 64
    assert held_out_count(5, 64) == 2 and held_out_count(3, 2) == 2
    train, held = carve_held_out(48, 64)
    assert len(train) == 36 and len(held) == 12 and sorted(train + held) == list(range(48))
    with pytest.raises(
        ValueError,
        match=r"^x_ad/train has 2 normal image\(s\), too few to train: --held-out-images keeps 2 out "
        r"\(statistics and calibration\) and training needs at least 1 more$",
    ):
        held_out_count(2, 64, "x_ad/train")


@pytest.mark.slow
def test_anomaly_train_runs_on_the_demo_split_with_its_defaults(tmp_path, capsys, caplog) -> None:
    """The README's demo data (48 normal train images) with the default `--held-out-images 64`; a split too small
    to train at all is one line naming the option, in-process (exit 2) and through `cadmtl anomaly train`'s
    launcher (no traceback)."""
    import logging
    import subprocess
    import sys

    from cadmtl.anomaly.learner_training import main as learner_main
    from dataset_scripts.make_demo import build_demo_dataset

    repo = tmp_path / "demo"
    build_demo_dataset(
        repo, train=48, validation=4, test=4, configs=["chassis_cls"], ad_configs=["exterior_ad"]
    )
    out = tmp_path / "learner"
    fast = ["--max-steps", "2", "--image-size", "32", "--batch-size", "4", "--mixed-precision", "no"]
    with caplog.at_level(logging.WARNING, logger="cadmtl.anomaly.learner_training"):
        assert learner_main([str(repo), "--config", "exterior_ad", "--output-dir", str(out), *fast]) == 0
    notices = [r.getMessage() for r in caplog.records if r.name == "cadmtl.anomaly.learner_training"]
    assert [n for n in notices if n.startswith("--held-out-images")] == [
        "--held-out-images 64 would leave 0 of the 48 normal images of exterior_ad/train to train: holding out 12 "
        "(a quarter) instead"
    ]
    summary = json.loads((out / "results.json").read_text())
    assert (summary["train_images"], summary["held_out_images"], summary["steps"]) == (36, 12, 2)
    assert type(load_anomaly_model(out / "model")) is AnomalyLearner

    small = [
        str(repo),
        "--config",
        "exterior_ad",
        "--output-dir",
        str(tmp_path / "small"),
        "--max-train-images",
        "2",
    ]
    line = (
        "error: exterior_ad/train has 2 normal image(s), too few to train: --held-out-images keeps 2 out "
        "(statistics and calibration) and training needs at least 1 more"
    )
    capsys.readouterr()
    assert learner_main([*small, *fast]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == line
    command = [sys.executable, "-m", "cadmtl", "anomaly", "train", *small, *fast]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == line
