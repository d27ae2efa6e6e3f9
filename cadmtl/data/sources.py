"""Per-task data for multi-task training: which dataset configs feed each task, the merged label space of a task,
resumable infinite training streams, CoBa's held-out batches and one exact pass over a split."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from cadmtl.data.pipeline import IMAGENET_MEAN, IMAGENET_STD, load_split, make_dataloader
from dataset_scripts.schema import label_names as dataset_label_names


@dataclass
class TaskSource:
    """One dataset config feeding a task: its label names and the map from its ids to the model's ids."""

    task: str
    config: str
    label_names: list[str]
    label_map: dict[int, int] | None = None

    @property
    def model_label_ids(self) -> list[int]:
        """The model's ids of this config's classes (its domain, when one head covers several domains)."""
        if self.label_map is None:
            raise ValueError(f"{self.config}: attach_label_maps has not been called.")
        return sorted(self.label_map.values())


def available_configs(dataset: str) -> list[str]:
    return datasets.get_dataset_config_names(dataset)


def discover_sources(
    dataset: str, configs_by_task: dict[str, list[str]], split: str
) -> dict[str, list[TaskSource]]:
    """Read each config's label names from its `split` features; unknown configs give one clear error."""
    known = available_configs(dataset)
    missing = sorted({c for configs in configs_by_task.values() for c in configs} - set(known))
    if missing:
        raise ValueError(f"Dataset {dataset} has no config {missing}; available configs: {known}.")
    sources: dict[str, list[TaskSource]] = {}
    for task, configs in configs_by_task.items():
        for config in configs:
            features = load_split(dataset, config, split, streaming=True).features
            sources.setdefault(task, []).append(TaskSource(task, config, dataset_label_names(features, task)))
    return sources


def merged_labels(sources: list[TaskSource]) -> list[str]:
    """The union of the configs' label names in first-seen order (so "background" stays first for seg)."""
    merged: list[str] = []
    for source in sources:
        merged.extend(name for name in source.label_names if name not in merged)
    return merged


def attach_label_maps(sources: list[TaskSource], model_labels: list[str]) -> None:
    """Map each config's label ids onto the model's; a name the model does not know is a clear error."""
    for source in sources:
        unknown = [name for name in source.label_names if name not in model_labels]
        if unknown:
            raise ValueError(
                f"Dataset config {source.config} has {source.task} labels {unknown} that the model does not know "
                f"(model labels: {model_labels}). Train a new model on this label set or remap the dataset."
            )
        source.label_map = {i: model_labels.index(name) for i, name in enumerate(source.label_names)}


@dataclass
class LoaderSettings:
    dataset: str
    split: str
    image_sizes: dict[str, int]
    batch_size: int
    num_workers: int
    shuffle_buffer: int
    seed: int
    rank: int
    world_size: int
    task_batch_sizes: dict[str, int] | None = None  # training batch size per task (default: batch_size)
    # The normalisation the backbone's weights expect (`backbone_normalization`: [-1, 1] for EfficientNet-Lite).
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD

    def train_batch_size(self, task: str) -> int:
        return (self.task_batch_sizes or {}).get(task, self.batch_size)


def source_loader(
    settings: LoaderSettings, source: TaskSource, split: str, *, batch_size: int, train: bool, **kwargs: Any
) -> torch.utils.data.DataLoader:
    """`make_dataloader` for one config of a task, with this run's sizes, label map, workers, seed and rank."""
    return make_dataloader(
        settings.dataset,
        source.config,
        split,
        source.task,
        batch_size=batch_size,
        image_size=settings.image_sizes[source.task],
        train=train,
        label_map=source.label_map,
        image_mean=settings.image_mean,
        image_std=settings.image_std,
        num_workers=settings.num_workers,
        seed=settings.seed,
        rank=settings.rank,
        world_size=settings.world_size,
        **kwargs,
    )


class TrainStreams:
    """An endless batch stream per task, drawing its configs in turn.

    Resumable: the state is how many batches each config's stream has handed out; `load_state_dict` rebuilds the
    streams from the same seed and fast-forwards them (skipping raw rows, see `TransformedStream`), so a resumed
    run sees exactly the batches it would have.
    """

    def __init__(self, sources: dict[str, list[TaskSource]], settings: LoaderSettings):
        self.sources = sources
        self.settings = settings
        self.consumed = {task: [0] * len(task_sources) for task, task_sources in sources.items()}
        self._iterators: dict[tuple[str, int], Iterator[dict[str, Any]]] = {}

    def _iterator(self, task: str, index: int) -> Iterator[dict[str, Any]]:
        key = (task, index)
        if key not in self._iterators:
            loader = source_loader(
                self.settings,
                self.sources[task][index],
                self.settings.split,
                batch_size=self.settings.train_batch_size(task),
                train=True,
                shuffle_buffer=self.settings.shuffle_buffer,
                infinite=True,
                skip_batches=self.consumed[task][index],  # fast-forward after a resume
            )
            self._iterators[key] = iter(loader)
        return self._iterators[key]

    def next_batch(self, task: str) -> tuple[TaskSource, dict[str, Any]]:
        """The task's next batch and the config it came from."""
        counts = self.consumed[task]
        index = sum(counts) % len(counts)  # round robin over the task's configs
        batch = next(self._iterator(task, index))
        counts[index] += 1
        return self.sources[task][index], batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": {task: list(counts) for task, counts in self.consumed.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        consumed = state["consumed"]
        if {t: len(c) for t, c in consumed.items()} != {t: len(c) for t, c in self.consumed.items()}:
            raise ValueError(
                f"The checkpoint's data streams {consumed} do not match this run's tasks and configs "
                f"{ {t: [s.config for s in src] for t, src in self.sources.items()} }."
            )
        self.consumed = {task: list(counts) for task, counts in consumed.items()}
        self._iterators.clear()


def source_batches(
    settings: LoaderSettings, source: TaskSource, batch_size: int, max_batches: int | None = None
) -> Iterator[dict[str, Any]]:
    """One exact pass over `settings.split` of one config (this rank's shards), at most `max_batches` batches."""
    loader = source_loader(
        settings, source, settings.split, batch_size=batch_size, train=False, infinite=False
    )
    for number, batch in enumerate(loader):
        if max_batches is not None and number >= max_batches:
            break
        yield batch


def held_out_batches(
    sources: list[TaskSource], settings: LoaderSettings, num_batches: int, batch_size: int
) -> list[tuple[TaskSource, dict[str, Any]]]:
    """CoBa's fixed held-out batches of a task: the first `num_batches` of the validation split of each of its
    configs (this rank's shards), repeated if a shard is shorter, so every rank runs the same number of forward
    passes and every config (domain) weighs in the task's held-out loss."""
    held_out = []
    for source in sources:
        batches = list(source_batches(settings, source, batch_size, num_batches))
        if not batches:
            raise ValueError(
                f"The {settings.split} split of {source.config} gave rank {settings.rank} no batch: CoBa needs "
                "held-out data for every task (add a validation split, or use fewer processes)."
            )
        held_out.extend((source, batches[i % len(batches)]) for i in range(num_batches))
    return held_out


def move_to(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, Any]:
    """pixel_values and labels of a collated batch on `device`."""
    labels = batch["labels"]
    if isinstance(labels, list):
        labels = [{k: v.to(device) for k, v in target.items()} for target in labels]
    else:
        labels = labels.to(device)
    return batch["pixel_values"].to(device, non_blocking=True), labels
