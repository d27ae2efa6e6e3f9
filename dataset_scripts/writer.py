"""Write one config split of a dataset repo folder as ``<config>/<split>-NNNNN-of-NNNNN.parquet`` shards.

Rows are encoded straight to Arrow with the config's ``Features`` (the schema metadata carries the
``ClassLabel`` names, so ``load_dataset`` restores them without any YAML), staged in an Arrow IPC file
next to the shards, then cut into equally sized shards once the row count and byte size are known. The
shard count follows the ``n_shards`` rules of streaming (see :func:`choose_num_shards`). Rows are
written in a seeded random order, so each shard is a random sample of the split. Output is
byte-for-byte deterministic for the same rows and library versions.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from datasets import Features
from tqdm.auto import tqdm

SPLITS = ("train", "validation", "test")
DEFAULT_MAX_SHARD_SIZE = 384 * 1024**2  # bytes; real builds land at 256-512 MB per shard
MIN_ROWS_PER_SHARD = 32
MAX_DEFAULT_SHARDS_BY_ROWS = 16
ROW_GROUP_SIZE = 100  # datasets' own row-group size for image datasets
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_.]+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.parquet$")
_SPLIT_NAME_RE = re.compile(r"^\w+(\.\w+)*$")  # what datasets accepts as a split name

ExistingPolicy = Literal["error", "replace", "append"]


class SplitExistsError(FileExistsError):
    pass


@dataclass
class SplitWriteResult:
    config: str
    split: str
    num_rows: int
    num_bytes: int
    files: list[Path]


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _prev_power_of_two(n: int) -> int:
    return 1 << max(0, math.floor(math.log2(max(n, 1))))


def choose_num_shards(num_rows: int, num_bytes: int, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> int:
    """Shard count for streaming: a power of two (a multiple of 64 past 64), so it divides evenly over
    the usual ``world_size x num_workers`` products; enough shards to keep each under ``max_shard_size``;
    and, for splits of at least a few hundred rows, up to 16 shards so 2 ranks x 8 workers all get work.
    """
    if num_rows <= 0:
        raise ValueError("cannot shard an empty split")
    by_size = math.ceil(num_bytes / max(max_shard_size, 1))
    by_size = _next_power_of_two(by_size) if by_size <= 64 else 64 * math.ceil(by_size / 64)
    by_rows = _prev_power_of_two(min(MAX_DEFAULT_SHARDS_BY_ROWS, max(1, num_rows // MIN_ROWS_PER_SHARD)))
    return max(1, min(num_rows, max(by_size, by_rows)))


def shard_files(repo_dir: str | Path, config: str, split: str) -> list[Path]:
    """The shard files of one split, in index order (empty when the split does not exist)."""
    folder = Path(repo_dir) / config
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = SHARD_RE.match(path.name)
        if match and match["split"] == split:
            found.append((int(match["index"]), path))
    return [path for _, path in sorted(found)]


def split_names(repo_dir: str | Path, config: str) -> list[str]:
    """The splits of a config folder that have shards (sorted by name)."""
    folder = Path(repo_dir) / config
    if not folder.is_dir():
        return []
    return sorted({m["split"] for p in folder.iterdir() if (m := SHARD_RE.match(p.name))})


def read_split_features(repo_dir: str | Path, config: str, split: str) -> Features | None:
    files = shard_files(repo_dir, config, split)
    return Features.from_arrow_schema(pq.read_schema(files[0])) if files else None


def iter_split_batches(
    repo_dir: str | Path, config: str, split: str, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    for path in shard_files(repo_dir, config, split):
        yield from pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP_SIZE, columns=columns)


def _encode_rows(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(rows, schema=schema)


class SplitWriter:
    """Collect the rows of one split and write its shards on :meth:`close`.

    ``existing`` says what to do when the split already has shards: ``"error"`` (default), ``"replace"``
    them, or ``"append"`` the new rows after the existing ones (their features must agree, except that
    the new label lists may extend the old ones at the end, which keeps every existing id valid).
    """

    def __init__(
        self,
        repo_dir: str | Path,
        config: str,
        split: str,
        features: Features,
        *,
        existing: ExistingPolicy = "error",
        num_shards: int | None = None,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        shuffle_rows: bool = True,
    ) -> None:
        if not _SPLIT_NAME_RE.match(split):
            raise ValueError(f"split name {split!r} is not valid (letters, digits, '_' and '.' only)")
        if not re.match(r"^[A-Za-z0-9_]+$", config):
            raise ValueError(f"config name {config!r} is not valid (letters, digits and '_' only)")
        if num_shards is not None and num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.repo_dir = Path(repo_dir)
        self.config, self.split, self.features = config, split, features
        self.num_shards, self.max_shard_size, self.shuffle_rows = num_shards, max_shard_size, shuffle_rows
        self._schema = features.arrow_schema
        self._columns = set(features)
        self._old_files = shard_files(self.repo_dir, config, split)
        if self._old_files and existing == "error":
            raise SplitExistsError(
                f"{self.repo_dir / config}: split {split!r} already exists ({len(self._old_files)} shards); "
                "pass --overwrite to replace it or --append to add rows to it"
            )
        # a failed conversion removes the config folder again when this writer made it (nothing is left behind)
        self._made_folder = not (self.repo_dir / config).exists()
        (self.repo_dir / config).mkdir(parents=True, exist_ok=True)
        self._staging_path = self.repo_dir / config / f".staging-{split}.arrow"
        self._sink = pa.OSFile(str(self._staging_path), "wb")
        self._writer = ipc.new_file(self._sink, self._schema)
        self._buffer: list[dict[str, Any]] = []
        self.num_rows = 0
        if self._old_files and existing == "append":
            self._stage_existing()

    def _stage_existing(self) -> None:
        old = Features.from_arrow_schema(pq.read_schema(self._old_files[0]))
        check_features_extend(old, self.features, f"{self.repo_dir / self.config} split {self.split!r}")
        for batch in iter_split_batches(self.repo_dir, self.config, self.split):
            # Same Arrow types (ClassLabel is int64 either way); only the label-name metadata changes.
            self._writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=self._schema))
            self.num_rows += batch.num_rows

    def add(self, row: dict[str, Any]) -> None:
        if row.keys() != self._columns:
            missing, extra = sorted(self._columns - row.keys()), sorted(row.keys() - self._columns)
            raise ValueError(
                f"{self.config}/{self.split}: row {row.get('image_id')!r} does not match the features "
                f"(missing columns {missing}, unexpected columns {extra})"
            )
        self._buffer.append(row)
        if len(self._buffer) >= ROW_GROUP_SIZE:
            self._flush()

    def add_all(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.add(row)

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_batch(_encode_rows(self._buffer, self._schema))
            self.num_rows += len(self._buffer)
            self._buffer = []

    def abort(self) -> None:
        """Drop everything staged; existing shards stay untouched."""
        self._writer.close()
        self._sink.close()
        self._staging_path.unlink(missing_ok=True)
        self._remove_new_empty_folder()

    def _remove_new_empty_folder(self) -> None:
        folder = self.repo_dir / self.config
        if self._made_folder and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()

    def close(self, show_progress: bool = False) -> SplitWriteResult:
        self._flush()
        self._writer.close()
        self._sink.close()
        try:
            if self.num_rows == 0:
                self._staging_path.unlink(missing_ok=True)
                self._remove_new_empty_folder()
                raise ValueError(
                    f"{self.repo_dir / self.config}: split {self.split!r} would be empty; not written"
                )
            with pa.memory_map(str(self._staging_path), "r") as source:
                table = ipc.open_file(source).read_all()
                return self._write_shards(table, show_progress)
        finally:
            self._staging_path.unlink(missing_ok=True)

    def _write_shards(self, table: pa.Table, show_progress: bool) -> SplitWriteResult:
        num_shards = self.num_shards or choose_num_shards(table.num_rows, table.nbytes, self.max_shard_size)
        num_shards = min(num_shards, table.num_rows)
        folder = self.repo_dir / self.config
        bounds = [round(i * table.num_rows / num_shards) for i in range(num_shards + 1)]
        # A seeded random row order makes every shard a random sample of the split (sources usually come
        # sorted, e.g. by class folder), so streaming readers mix well with a small shuffle buffer.
        order = None
        if self.shuffle_rows:
            seed = zlib.crc32(f"{self.config}/{self.split}".encode())
            order = np.random.default_rng(seed).permutation(table.num_rows)
        temp_files = []
        for index in tqdm(
            range(num_shards),
            desc=f"{self.config}/{self.split} shards",
            disable=not show_progress,
            leave=False,
        ):
            if order is None:
                shard = table.slice(bounds[index], bounds[index + 1] - bounds[index])
            else:
                shard = table.take(pa.array(order[bounds[index] : bounds[index + 1]]))
            temp = folder / f".tmp-{self.split}-{index:05d}.parquet"
            pq.write_table(shard, temp, row_group_size=ROW_GROUP_SIZE, compression="snappy")
            temp_files.append(temp)
        for old in self._old_files:
            old.unlink()
        files = []
        for index, temp in enumerate(temp_files):
            final = folder / f"{self.split}-{index:05d}-of-{num_shards:05d}.parquet"
            os.replace(temp, final)
            files.append(final)
        return SplitWriteResult(
            self.config, self.split, table.num_rows, sum(f.stat().st_size for f in files), files
        )


def check_features_extend(old: Features, new: Features, where: str) -> None:
    """Raise unless ``new`` equals ``old`` up to label lists that only grow at the end."""
    old_dict, new_dict = old.to_dict(), new.to_dict()

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            if a.get("_type") == "ClassLabel" and b.get("_type") == "ClassLabel":
                old_names, new_names = a.get("names", []), b.get("names", [])
                if new_names[: len(old_names)] != old_names:
                    raise ValueError(
                        f"{where}: the labels of {path or 'the config'} changed from {old_names} to {new_names}; "
                        "new classes may only be appended at the end"
                    )
                return
            if set(a) != set(b):
                raise ValueError(
                    f"{where}: columns differ at {path or 'top level'}: {sorted(a)} vs {sorted(b)}"
                )
            for key in a:
                walk(a[key], b[key], f"{path}.{key}" if path else key)
        elif a != b:
            raise ValueError(f"{where}: feature {path} differs: {a} vs {b}")

    walk(old_dict, new_dict, "")


def write_split(
    repo_dir: str | Path,
    config: str,
    split: str,
    rows: Iterable[dict[str, Any]],
    features: Features,
    *,
    existing: ExistingPolicy = "error",
    num_shards: int | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    shuffle_rows: bool = True,
    show_progress: bool = False,
) -> SplitWriteResult:
    """Write ``rows`` (already in storage form: images as ``{"bytes": ..., "path": None}``, labels as
    ids) as the shards of ``config/split``. Nothing is replaced unless all rows were written."""
    writer = SplitWriter(
        repo_dir,
        config,
        split,
        features,
        existing=existing,
        num_shards=num_shards,
        max_shard_size=max_shard_size,
        shuffle_rows=shuffle_rows,
    )
    try:
        writer.add_all(rows)
    except BaseException:
        writer.abort()
        raise
    return writer.close(show_progress=show_progress)
