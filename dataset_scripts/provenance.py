"""What a model was trained on, as its config records it (`training_data`), and whether those images were
generated: the demo app says so above its results, because a model trained on `cadmtl data make-demo`'s
procedural images answers little of use on real photos.

The record is written by `cadmtl train` (the multi-task model's config.json) and `cadmtl anomaly fit` (the
scorer's config.json)::

    {"repo": "data/cad100k-mini", "configs": ["exterior_ad"], "generated": true}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .make_demo import DEMO_PRETTY_NAME


def _card_metadata(card: Path) -> dict[str, Any]:
    """The YAML front matter of a repo's README.md ({} without one)."""
    text = card.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return {}
    front = text.split("---", 2)[1]
    data = yaml.safe_load(front)
    return data if isinstance(data, dict) else {}


def is_generated_repo(repo: str) -> bool:
    """Whether `repo` (a local repo folder or a Hub id) holds `cadmtl data make-demo`'s generated images: a folder
    by its card's `pretty_name`, a Hub id (not readable offline) by its name."""
    path = Path(repo)
    card = path / "README.md"
    if card.is_file():
        return _card_metadata(card).get("pretty_name") == DEMO_PRETTY_NAME
    return path.name == DEMO_PRETTY_NAME


def training_data_record(repo: str, configs: Sequence[str]) -> dict[str, Any]:
    """The `training_data` record a trained model's config keeps: the repo (folder or Hub id), its configs, and
    whether its images are generated."""
    return {"repo": str(repo), "configs": list(configs), "generated": is_generated_repo(str(repo))}


def trained_on_generated_images(config: Any) -> bool:
    """Whether a model config's `training_data` record says its training images were generated (False for a
    model that records no training data)."""
    record = getattr(config, "training_data", None)
    return isinstance(record, dict) and bool(record.get("generated"))
