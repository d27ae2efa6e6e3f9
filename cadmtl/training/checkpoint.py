"""Resumable checkpoints of the training loop: what they hold, where they go, how a resumed run finds them.

A checkpoint is Accelerate's ``save_state`` folder (model, optimizer, RNG states) plus the states of the loop's
other objects (weighting, schedulers, data streams, best model, EMA), saved here rather than by Accelerate:
``state_<name>.pt`` holds one object's ``state_dict()`` (tensors and plain values only) and is read back
with ``torch.load(weights_only=True)``, so resuming never unpickles arbitrary objects (Accelerate's own loader of
registered objects would). ``cadmtl_config.json`` holds the model's config (to refuse a checkpoint of another
model) and ``checkpoint_objects.json`` says which file holds which object, so readers never depend on order.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from modeling_cadmtl import CadMtlModel

OBJECTS_INDEX = "checkpoint_objects.json"


class LoopState:
    """Counters of the training loop that a resumed run must continue from (checkpointed with Accelerate)."""

    def __init__(self) -> None:
        self.step = 0
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        vars(self).update(state)


class StatefulObjects(Mapping[str, str]):
    """The named objects (each with ``state_dict`` / ``load_state_dict``) a checkpoint saves besides Accelerate's
    state; as a mapping it is the index ``{name: file}`` written to ``checkpoint_objects.json``."""

    def __init__(self, objects: Mapping[str, Any]) -> None:
        self.objects = dict(objects)
        # not Accelerate's `custom_checkpoint_N.pkl`: its load_state counts those against its own registrations
        self.files = {name: f"state_{name}.pt" for name in self.objects}

    def __getitem__(self, name: str) -> str:
        return self.files[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def save(self, folder: str | Path) -> None:
        for name, stateful in self.objects.items():
            torch.save(stateful.state_dict(), Path(folder, self.files[name]))

    def load(self, checkpoint: str | Path) -> None:
        """Restore every object from ``checkpoint`` (by the checkpoint's own index when it has one)."""
        has_index = Path(checkpoint, OBJECTS_INDEX).exists()
        for name, stateful in self.objects.items():
            path = Path(checkpoint, self.files[name])
            stateful.load_state_dict(registered_state(checkpoint, name) if has_index else _load_state(path))


def register_stateful(objects: Mapping[str, Any]) -> StatefulObjects:
    """The objects a checkpoint saves besides Accelerate's state: pass the result to :func:`save_checkpoint` and,
    on resume, call its ``load(checkpoint)`` after ``accelerator.load_state``."""
    return StatefulObjects(objects)


def _load_state(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: the checkpoint lacks a state this run needs") from None
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds more than tensors and plain values, so it is not loaded (weights_only=True): "
            f"{str(error).splitlines()[0]}"
        ) from None


def registered_state(checkpoint: str | Path, name: str) -> Any:
    """The saved state of the object registered as ``name`` (e.g. "weighting", "loop") in a checkpoint, loaded
    with ``weights_only=True`` (tensors and plain values only)."""
    checkpoint = Path(checkpoint)
    index_path = checkpoint / OBJECTS_INDEX
    if not index_path.exists():
        raise FileNotFoundError(f"{checkpoint} has no {OBJECTS_INDEX}: not a train_accelerate.py checkpoint.")
    index = json.loads(index_path.read_text())
    if name not in index:
        raise KeyError(f"{checkpoint} holds no object named {name!r}; it holds {sorted(index)}.")
    return _load_state(checkpoint / Path(index[name]).name)


def find_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path) -> Path | None:
    """The folder to resume from: an explicit path, the newest ``step_N`` under output_dir for "latest", or None."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"Checkpoint folder {path} does not exist.")
        return path
    checkpoints = sorted(Path(output_dir, "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    accelerator: Accelerator,
    model: CadMtlModel,
    output_dir: str | Path,
    step: int,
    objects: StatefulObjects,
    total_limit: int,
) -> Path:
    """Write to a temporary folder, then rename: a run killed mid-save leaves no half-written checkpoint."""
    root = Path(output_dir, "checkpoints")
    final, partial = root / f"step_{step}", root / f".partial_step_{step}"
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every rank has written its RNG state into the folder before it moves
    if accelerator.is_main_process:
        (partial / "cadmtl_config.json").write_text(model.config.to_json_string())
        objects.save(partial)
        (partial / OBJECTS_INDEX).write_text(json.dumps(dict(objects), indent=2))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        kept = sorted(root.glob("step_*"), key=lambda p: int(p.name[5:]))
        for old in kept[: max(0, len(kept) - total_limit)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def check_same_model(checkpoint: Path, model: CadMtlModel) -> None:
    """Refuse a checkpoint of a different model before Accelerate fails on tensor shapes."""
    saved_path = checkpoint / "cadmtl_config.json"
    if not saved_path.exists():
        raise ValueError(f"{checkpoint} is not a train_accelerate.py checkpoint (no cadmtl_config.json).")
    saved = json.loads(saved_path.read_text())
    current = model.config.to_dict()
    for key in ("cls_labels", "det_labels", "seg_labels", "neck_channels", "seg_channels", "det_num_convs"):
        if saved.get(key) != current.get(key):
            raise ValueError(
                f"Checkpoint {checkpoint} belongs to a different model: {key} is {saved.get(key)} there and "
                f"{current.get(key)} here."
            )
    for key in ("model_type", "hidden_size", "num_hidden_layers", "hidden_sizes", "depths", "out_indices"):
        if saved["backbone_config"].get(key) != current["backbone_config"].get(key):
            raise ValueError(
                f"Checkpoint {checkpoint} belongs to a different backbone: {key} is "
                f"{saved['backbone_config'].get(key)} there and {current['backbone_config'].get(key)} here."
            )


def check_same_objects(checkpoint: Path, objects_index: Mapping[str, str]) -> None:
    """Refuse a checkpoint whose registered objects differ from this run's (e.g. one saved with an EMA resumed
    without ``--ema_decay``), before Accelerate loads a state into the wrong object."""
    index_path = checkpoint / OBJECTS_INDEX
    if not index_path.exists():
        return  # an older checkpoint: Accelerate still checks the count
    saved = json.loads(index_path.read_text())
    if saved != dict(objects_index):
        missing, extra = sorted(set(saved) - set(objects_index)), sorted(set(objects_index) - set(saved))
        raise ValueError(
            f"Checkpoint {checkpoint} holds the states {sorted(saved)}, this run registers {sorted(objects_index)}"
            f" (only in the checkpoint: {missing}; only in this run: {extra}). Resume with the options it was "
            "saved with (--eval_every for 'best' and 'results', --ema_decay for 'ema')."
        )
