"""`dataset_scripts.provenance`: whether a repo (and so a model trained on it) holds generated demo images."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from dataset_scripts.card import write_card
from dataset_scripts.make_demo import build_demo_dataset
from dataset_scripts.provenance import is_generated_repo, trained_on_generated_images, training_data_record


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("provenance") / "my-demo-copy"  # recognised by its card, not its name
    build_demo_dataset(folder, train=2, validation=2, test=2, configs=["chassis_cls"])
    return folder


def test_a_make_demo_repo_is_generated_and_a_photo_repo_is_not(demo_repo: Path, tmp_path: Path) -> None:
    assert is_generated_repo(str(demo_repo))
    assert training_data_record(str(demo_repo), ["exterior_ad"]) == {
        "repo": str(demo_repo),
        "configs": ["exterior_ad"],
        "generated": True,
    }
    # the same shards under another card (what make-public writes) are photos as far as the record knows
    (demo_repo / "README.md").rename(tmp_path / "demo-card.md")
    try:
        write_card(demo_repo, pretty_name="CAD-MTL public car benchmark")
        assert not is_generated_repo(str(demo_repo))
        assert training_data_record(str(demo_repo), ["cars_ad"])["generated"] is False
    finally:
        (tmp_path / "demo-card.md").replace(demo_repo / "README.md")
    assert not is_generated_repo(str(tmp_path / "no-card"))  # a folder without a card
    # Hub ids (not readable offline) by their name
    assert is_generated_repo("someone/cad100k-mini") and not is_generated_repo("someone/line-photos")


def test_a_config_says_generated_only_through_its_record() -> None:
    assert trained_on_generated_images(SimpleNamespace(training_data={"repo": "r", "generated": True}))
    assert not trained_on_generated_images(SimpleNamespace(training_data={"repo": "r", "generated": False}))
    assert not trained_on_generated_images(SimpleNamespace())  # a model saved before the record existed
