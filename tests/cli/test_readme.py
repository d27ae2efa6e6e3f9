"""The README stays true: its test command is what CI runs, and its Python snippets and those of the docs/
pages it links to run (offline)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cadmtl.testing import populate_hf_cache, tiny_cadmtl_config
from modeling_cadmtl import CadMtlImageProcessor, CadMtlModel

REPO_ROOT = Path(__file__).resolve().parents[2]

README = (REPO_ROOT / "README.md").read_text()
# The front page and the user-guide pages it links to: every ```python block of each is run.
DOC_PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
SKIP_MARKER = re.compile(r"<!-- snippet: skip \((?P<reason>[^)]+)\) -->\s*$")


def python_snippets() -> list[tuple[str, str, str | None]]:
    """("page:line", code, skip reason or None) for every ```python block of the README and the docs pages."""
    snippets = []
    for page in DOC_PAGES:
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines):
            if line.strip() == "```python":
                end = lines.index("```", number + 1)
                previous = next((lines[i] for i in range(number - 1, -1, -1) if lines[i].strip()), "")
                marker = SKIP_MARKER.match(previous.strip())
                where = f"{page.relative_to(REPO_ROOT)}:{number + 1}"
                snippets.append((where, "\n".join(lines[number + 1 : end]), marker and marker["reason"]))
    return snippets


def bash_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_command = next(command for command in bash_commands() if "pytest" in command)
    ci_script = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_script


@pytest.mark.slow
@pytest.mark.parametrize("line, code, skip_reason", python_snippets(), ids=lambda v: str(v)[:24])
def test_readme_python_snippet_runs(line: str, code: str, skip_reason: str | None, tmp_path) -> None:
    if skip_reason:
        pytest.skip(f"{line}: {skip_reason}")
    hf_home = tmp_path / "hf_home"
    if "cad-mtl/dinov3-b-adaptive" in code:
        # Stand-in for the released checkpoint: a tiny model laid out in an offline Hugging Face cache.
        model_dir = tmp_path / "model"
        torch.manual_seed(0)
        CadMtlModel(tiny_cadmtl_config()).save_pretrained(
            model_dir, image_processor=CadMtlImageProcessor(size={"height": 64, "width": 64})
        )
        populate_hf_cache(model_dir, "cad-mtl/dinov3-b-adaptive", hf_home)
    if "outputs/ad-demo/model" in code:
        # Stand-in for `cadmtl anomaly fit ... --image-size 128`: a tiny fitted, calibrated scorer.
        from cadmtl.anomaly import PatchMemoryScorer
        from cadmtl.features import backbone_from_preset

        torch.manual_seed(0)
        scorer = PatchMemoryScorer.from_backbone(backbone_from_preset("tiny"), image_size=(128, 128))
        scorer.fit(torch.randn(2, 3, 128, 128))
        scorer.image_threshold, scorer.pixel_threshold = 1.0, 2.0
        scorer.save_pretrained(tmp_path / "outputs" / "ad-demo" / "model")
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, f"{line} failed:\n{completed.stderr[-3000:]}"


@pytest.mark.slow
def test_readme_default_run_command_trains_evaluates_and_saves(tmp_path) -> None:
    """The README's main command, run as written (from a scratch working directory holding the script)."""
    main_line = next(command for command in bash_commands() if "train_accelerate.py" in command)
    command = main_line.split("&&")[-1].split()
    assert command[:3] == [".venv/bin/accelerate", "launch", "train_accelerate.py"] and len(command) == 3
    (tmp_path / "train_accelerate.py").symlink_to(REPO_ROOT / "train_accelerate.py")
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [accelerate, *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    output = tmp_path / "outputs" / "cadmtl-demo"
    assert (tmp_path / "data" / "cad100k-mini" / "README.md").exists()  # the demo dataset was generated
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "modeling_cadmtl.py",
    } <= {p.name for p in (output / "model").iterdir()}
    summary = json.loads((output / "eval_results.json").read_text())
    configs = {name.split("@")[0] for name in summary["results"]}
    assert configs == {
        "exterior_seg", "exterior_det", "interior_det", "general_det",
        "chassis_cls", "engine_bay_cls", "electrical_cls", "ev_specific_cls",
    }  # fmt: skip
    assert summary["steps"] == 240 and summary["nonfinite_steps"] == 0
    assert (output / "training_curves.png").stat().st_size > 10_000
    # The model card carries the test results as Hub `model-index` metadata and the CoBa settings in its body.
    card = (output / "model" / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    evaluated = {r["dataset"]["config"] for r in metadata["model-index"][0]["results"]}
    assert evaluated == configs
    assert '"paradigm": "adaptive"' in card and '"history_length": 30' in card
    # Every task learns (issue "Evidence that the recipe learns"): the last logging window's loss of each task is
    # below 90 % of the first, and classification is at least twice chance (4 classes per domain) on average.
    records = [json.loads(line) for line in (output / "logs" / "metrics.jsonl").read_text().splitlines()]
    for task in ("cls", "det", "seg"):
        losses = [record[f"loss/{task}"] for record in records if f"loss/{task}" in record]
        assert losses[-1] < 0.9 * losses[0], (task, losses)
    accuracies = [
        r["metrics"]["acc@1"] for name, r in summary["results"].items() if name.endswith("_cls@test")
    ]
    assert len(accuracies) == 4 and sum(accuracies) / 4 >= 2 * 0.25, accuracies
    # The card names the folder it was trained on, not a Hub dataset it never saw.
    assert "datasets" not in metadata and "cad100k-mini: " in card


def test_readme_front_page_is_short_and_its_links_resolve() -> None:
    """A newcomer reads the front page in ten minutes; the user guide lives in docs/ (issue 18)."""
    assert len(README.splitlines()) <= 250
    targets = re.findall(r"\]\(([^)#]+)\)", README)
    assert {"docs/model.md", "docs/training.md", "docs/anomaly.md", "docs/deployment.md"} <= set(targets)
    missing = [target for target in targets if "://" not in target and not (REPO_ROOT / target).exists()]
    assert missing == []
    for page in DOC_PAGES[1:]:
        page_targets = re.findall(r"\]\(([^)#]+)\)", page.read_text())
        broken = [t for t in page_targets if "://" not in t and not (page.parent / t).exists()]
        assert broken == [], (page.name, broken)


def test_main_job_installs_only_the_core_dependencies() -> None:
    """The main job needs none of the extras (trl, onnx, gradio, selenium, ...); the test command installs them."""
    main_line = next(command for command in bash_commands() if "train_accelerate.py" in command)
    assert ".venv/bin/pip install -q -e . " in main_line + " "
    test_line = next(command for command in bash_commands() if "pytest" in command)
    assert '-e ".[test,lint]"' in test_line
