"""The Hugging Face Space files stay valid: front matter a Space reads, requirements that cover the project's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_space_readme_front_matter_names_the_gradio_app() -> None:
    text = (REPO_ROOT / "space" / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py"
    assert (REPO_ROOT / front["app_file"]).is_file()
    assert len(front["short_description"]) <= 60  # the Hub rejects longer ones


def test_space_requirements_cover_the_project_and_demo_dependencies() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    needed = {_name(r) for r in project["dependencies"]} | {
        _name(r) for r in project["optional-dependencies"]["demo"]
    }
    lines = (REPO_ROOT / "space" / "requirements.txt").read_text().splitlines()
    listed = {_name(line) for line in lines if line.strip() and not line.startswith(("#", "-"))}
    # gradio itself comes from the front matter's sdk_version
    assert needed - listed == {"gradio"}
