"""Shard writer and dataset card: shard counts, determinism, appends, and load_dataset round trips."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from dataset_scripts.card import GENERATED_MARKER, RepoLayoutError, scan_repo, write_card
from dataset_scripts.images import encode_png
from dataset_scripts.push import push_repo
from dataset_scripts.schema import features_for, label_names
from dataset_scripts.writer import SplitExistsError, choose_num_shards, shard_files, write_split

MB = 1024**2


def _image(value: int, size: tuple[int, int] = (24, 16)) -> dict:
    return {"bytes": encode_png(np.full((size[1], size[0], 3), value, np.uint8)), "path": None}


def _common(index: int, split: str, normal: bool) -> dict:
    return {
        "image": _image(index * 7 % 256),
        "image_id": f"{split}/{index:03d}",
        "width": 24,
        "height": 16,
        "domain": "exterior",
        "system": "body",
        "part": "hood",
        "source": "synthetic",
        "is_normal": normal,
    }


def cls_rows(count: int, split: str = "train") -> list[dict]:
    return [{**_common(i, split, i % 4 == 0), "label": 0 if i % 4 == 0 else 1 + i % 2} for i in range(count)]


def det_rows(count: int, split: str = "train") -> list[dict]:
    rows = []
    for i in range(count):
        n = 0 if i % 4 == 0 else 1 + i % 2
        rows.append(
            {
                **_common(i, split, n == 0),
                "objects": {
                    "bbox": [[1.0, 2.0, 5.0, 6.0]] * n,
                    "category": [k % 2 for k in range(n)],
                    "area": [30.0] * n,
                    "id": [i * 10 + k for k in range(n)],
                },
            }
        )
    return rows


def seg_rows(count: int, split: str = "train") -> list[dict]:
    rows = []
    for i in range(count):
        mask = np.zeros((16, 24), np.uint8)
        if i % 4:
            mask[2:8, 3:9] = 1 + i % 2
            mask[0, 0] = 255
        rows.append(
            {
                **_common(i, split, i % 4 == 0),
                "mask": {"bytes": encode_png(mask), "path": None},
                "mask_classes": sorted(int(v) for v in np.unique(mask) if v != 255),
            }
        )
    return rows


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A small repo with one config per task: train 8 rows in 4 shards, validation 4 rows."""
    root = tmp_path_factory.mktemp("repo")
    specs = {
        "chassis_cls": (cls_rows, ["normal", "brake_pad_worn", "brake_rotor_rust"]),
        "exterior_det": (det_rows, ["dent", "scratch"]),
        "exterior_seg": (seg_rows, ["background", "dent", "scratch"]),
    }
    for config, (make_rows, names) in specs.items():
        features = features_for(config.rsplit("_", 1)[1], names)
        write_split(root, config, "train", make_rows(8, "train"), features, num_shards=4)
        write_split(root, config, "validation", make_rows(4, "validation"), features)
    write_card(root)
    return root


def test_choose_num_shards() -> None:
    assert choose_num_shards(10, 5 * MB) == 1
    assert choose_num_shards(400, 20 * MB) == 8  # 400 rows // 32 -> 12 -> power of two below
    assert choose_num_shards(9000, 80 * MB) == 16  # enough rows for 16 shards
    assert choose_num_shards(100_000, 40_000 * MB) == 128  # 105 by size -> next multiple of 64
    assert choose_num_shards(100_000, 10_000 * MB) == 32  # 27 by size -> next power of two
    assert choose_num_shards(3, 10_000 * MB) == 3  # never more shards than rows
    with pytest.raises(ValueError, match="empty"):
        choose_num_shards(0, 0)


def test_shards_and_rows(repo: Path) -> None:
    files = shard_files(repo, "exterior_det", "train")
    assert [f.name for f in files] == [f"train-{i:05d}-of-00004.parquet" for i in range(4)]
    assert [f.name for f in shard_files(repo, "exterior_det", "validation")] == [
        "validation-00000-of-00001.parquet"
    ]


@pytest.mark.parametrize(
    "task, config", [("cls", "chassis_cls"), ("det", "exterior_det"), ("seg", "exterior_seg")]
)
@pytest.mark.parametrize("streaming", [True, False])
def test_load_dataset_round_trip(repo: Path, tmp_path: Path, task: str, config: str, streaming: bool) -> None:
    kwargs = {} if streaming else {"cache_dir": str(tmp_path / "cache")}
    dataset = datasets.load_dataset(str(repo), config, split="train", streaming=streaming, **kwargs)
    rows = sorted(dataset, key=lambda r: r["image_id"])  # rows are stored in a seeded random order
    assert [r["image_id"] for r in rows] == [f"train/{i:03d}" for i in range(8)]
    first = rows[1]
    assert first["image"].size == (24, 16) and first["image"].mode == "RGB"
    assert (first["domain"], first["system"], first["part"], first["source"]) == (
        "exterior",
        "body",
        "hood",
        "synthetic",
    )
    assert [r["is_normal"] for r in rows] == [i % 4 == 0 for i in range(8)]
    if task == "cls":
        assert label_names(dataset.features, "cls") == ["normal", "brake_pad_worn", "brake_rotor_rust"]
        assert [r["label"] for r in rows] == [0, 2, 1, 2, 0, 2, 1, 2]
    elif task == "det":
        assert label_names(dataset.features, "det") == ["dent", "scratch"]
        assert first["objects"] == {
            "bbox": [[1.0, 2.0, 5.0, 6.0]] * 2,
            "category": [0, 1],
            "area": [30.0, 30.0],
            "id": [10, 11],
        }
        assert rows[0]["objects"]["bbox"] == []
    else:
        assert label_names(dataset.features, "seg") == ["background", "dent", "scratch"]
        mask = np.asarray(first["mask"])
        assert first["mask"].mode == "L" and mask.shape == (16, 24)
        assert mask[2:8, 3:9].tolist() == np.full((6, 6), 2).tolist() and mask[0, 0] == 255
        assert first["mask_classes"] == [0, 2]


def test_card_yaml_matches_the_shards(repo: Path) -> None:
    text = (repo / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert [c["config_name"] for c in meta["configs"]] == ["exterior_seg", "exterior_det", "chassis_cls"]
    assert meta["configs"][0]["default"] is True and "default" not in meta["configs"][1]
    assert meta["configs"][1]["data_files"] == [
        {"split": "train", "path": "exterior_det/train-*.parquet"},
        {"split": "validation", "path": "exterior_det/validation-*.parquet"},
    ]
    counts = {
        (info["config_name"], s["name"]): s["num_examples"]
        for info in meta["dataset_info"]
        for s in info["splits"]
    }
    for config in ("chassis_cls", "exterior_det", "exterior_seg"):
        for split in ("train", "validation"):
            rows = sum(1 for _ in datasets.load_dataset(str(repo), config, split=split, streaming=True))
            assert counts[(config, split)] == rows
    assert datasets.get_dataset_config_names(str(repo))[0] == "exterior_seg"
    assert "| `exterior_det` | det | 2 | train | 8 | 2 | synthetic 8 | 4 |" in text
    assert "| 0 | `dent` | 6 | 3 |" in text  # det counts objects: 6 dents in train, 3 in validation


def test_card_keeps_the_intro_and_the_default_config(repo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy)
    card = copy / "README.md"
    write_card(copy, default_config="chassis_cls")
    head, tail = card.read_text().split(GENERATED_MARKER)
    card.write_text(
        head.replace("Car-related visual anomaly data", "Our plant's own intro text")
        + GENERATED_MARKER
        + tail
    )
    write_card(copy)
    text = card.read_text()
    assert "Our plant's own intro text" in text
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["configs"][0] == {
        "config_name": "chassis_cls",
        "default": True,
        "data_files": [
            {"split": "train", "path": "chassis_cls/train-*.parquet"},
            {"split": "validation", "path": "chassis_cls/validation-*.parquet"},
        ],
    }
    assert datasets.get_dataset_config_names(str(copy))[0] == "chassis_cls"


def test_rewriting_is_byte_identical(tmp_path: Path) -> None:
    digests = []
    for name in ("a", "b"):
        result = write_split(
            tmp_path / name,
            "exterior_det",
            "train",
            det_rows(9),
            features_for("det", ["dent", "scratch"]),
            num_shards=2,
        )
        digests.append([hashlib.sha256(p.read_bytes()).hexdigest() for p in result.files])
    assert digests[0] == digests[1]


def test_existing_split_needs_overwrite_or_append(tmp_path: Path) -> None:
    features = features_for("cls", ["normal", "rust"])
    write_split(
        tmp_path, "chassis_cls", "train", cls_rows(4)[:4], features_for("cls", ["normal", "rust", "dent"])
    )
    with pytest.raises(SplitExistsError, match=r"already exists.*--overwrite.*--append"):
        write_split(tmp_path, "chassis_cls", "train", cls_rows(2), features)
    # Appending may grow the class list at the end: existing ids keep their meaning.
    grown = features_for("cls", ["normal", "rust", "dent", "crack"])
    extra = [{**r, "image_id": f"extra/{i}", "label": 3} for i, r in enumerate(cls_rows(2))]
    result = write_split(tmp_path, "chassis_cls", "train", extra, grown, existing="append")
    assert result.num_rows == 6
    loaded = datasets.load_dataset(str(tmp_path / "chassis_cls"), split="train", streaming=True)
    labels = {r["image_id"]: r["label"] for r in loaded}
    assert labels == {
        "train/000": 0,
        "train/001": 2,
        "train/002": 1,
        "train/003": 2,
        "extra/0": 3,
        "extra/1": 3,
    }
    with pytest.raises(ValueError, match="new classes may only be appended"):
        write_split(
            tmp_path,
            "chassis_cls",
            "train",
            cls_rows(1),
            features_for("cls", ["rust", "normal"]),
            existing="append",
        )


def test_rows_must_match_the_features_and_splits_cannot_be_empty(tmp_path: Path) -> None:
    features = features_for("cls", ["normal", "rust"])
    row = cls_rows(1)[0]
    del row["label"]
    with pytest.raises(ValueError, match=r"missing columns \['label'\]"):
        write_split(tmp_path, "chassis_cls", "train", [row], features)
    with pytest.raises(ValueError, match="would be empty"):
        write_split(tmp_path, "chassis_cls", "train", [], features)
    assert shard_files(tmp_path, "chassis_cls", "train") == []
    assert not list((tmp_path / "chassis_cls").glob(".staging*"))


def test_scan_repo_rejects_incomplete_shards(repo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "broken"
    shutil.copytree(repo, copy)
    (copy / "exterior_det" / "train-00002-of-00004.parquet").unlink()
    with pytest.raises(RepoLayoutError, match="incomplete or mixed"):
        scan_repo(copy)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RepoLayoutError, match="no <config>"):
        write_card(empty)


class FakeHub:
    """A stand-in for HfApi keeping the repo's files in memory; `refuse_commit` makes that commit fail."""

    def __init__(self, files: dict[str, int] | None = None, refuse_commit: int | None = None) -> None:
        self.files = dict(files or {})
        self.commits: list[tuple[str, list[str], list[str]]] = []
        self.refuse_commit = refuse_commit
        self.created = []

    def create_repo(self, repo_id, **kwargs):
        self.created.append((repo_id, kwargs))

    def list_repo_tree(self, repo_id, **kwargs):
        return [type("RepoFile", (), {"path": path, "size": size})() for path, size in self.files.items()]

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.errors import HfHubHTTPError

        if self.refuse_commit == len(self.commits) + 1:
            self.refuse_commit = None
            response = type("Response", (), {"headers": {}, "request": None, "status_code": 403})()
            raise HfHubHTTPError("403 Forbidden: storage quota exceeded", response=response)
        added = [op.path_in_repo for op in operations if isinstance(op, CommitOperationAdd)]
        deleted = [op.path_in_repo for op in operations if not isinstance(op, CommitOperationAdd)]
        for op in operations:
            if isinstance(op, CommitOperationAdd):
                self.files[op.path_in_repo] = Path(op.path_or_fileobj).stat().st_size
            else:
                self.files.pop(op.path_in_repo)
        self.commits.append((commit_message, added, deleted))
        return type("Info", (), {"commit_url": f"https://hf.co/commit/{len(self.commits)}"})()


def test_push_uploads_shards_in_commits_then_the_card_and_resumes(repo: Path, tmp_path: Path) -> None:
    from dataset_scripts.push import PushRefusedError

    copy = tmp_path / "to_push"
    shutil.copytree(repo, copy)
    shards = sorted(p.relative_to(copy).as_posix() for p in copy.glob("*/*.parquet"))
    hub = FakeHub(files={"old_cls/train-00000-of-00001.parquet": 10}, refuse_commit=2)
    with pytest.raises(
        PushRefusedError, match=r"refused the commit 'Upload shards 2/.*run the same command again"
    ):
        push_repo(copy, "cad-mtl/cad100k-mini", private=True, api=hub, files_per_commit=3)
    assert hub.created == [
        ("cad-mtl/cad100k-mini", {"repo_type": "dataset", "private": True, "exist_ok": True})
    ]
    assert len(hub.commits) == 1 and hub.commits[0][1] == shards[:3]  # the first commit stays
    assert "README.md" not in hub.files  # the card only comes once every shard is there

    url = push_repo(copy, "cad-mtl/cad100k-mini", api=hub, files_per_commit=3)  # resumes
    uploaded = [path for _, added, _ in hub.commits[1:-1] for path in added]
    assert uploaded == shards[3:]  # nothing uploaded twice
    message, added, deleted = hub.commits[-1]
    assert added[0] == "README.md" and all(path.startswith("reports/") for path in added[1:])
    assert deleted == ["old_cls/train-00000-of-00001.parquet"]  # a shard that no longer exists locally
    assert message.startswith("Upload ") and url == f"https://hf.co/commit/{len(hub.commits)}"
    assert (
        set(hub.files) >= set(shards)
        and 'load_dataset("cad-mtl/cad100k-mini"' in (copy / "README.md").read_text()
    )
    with pytest.raises(ValueError, match="needs a namespace"):
        push_repo(copy, "cad100k", api=FakeHub())


def test_shard_batches_respect_files_and_bytes(tmp_path: Path) -> None:
    from dataset_scripts.push import shard_batches

    sizes = [5, 5, 5, 20, 1]
    paths = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"s{i}.parquet"
        path.write_bytes(b"x" * size)
        paths.append(path)
    batches = shard_batches(paths, files_per_commit=2, max_commit_bytes=12)
    assert [[p.name for p in batch] for batch in batches] == [
        ["s0.parquet", "s1.parquet"],
        ["s2.parquet"],
        ["s3.parquet"],
        ["s4.parquet"],
    ]


def test_images_are_embedded_not_referenced(repo: Path, tmp_path: Path) -> None:
    row = next(
        iter(
            datasets.load_dataset(str(repo), "chassis_cls", split="train", streaming=True).cast_column(
                "image", datasets.Image(decode=False)
            )
        )
    )
    assert row["image"]["path"] is None
    assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (24, 16)
