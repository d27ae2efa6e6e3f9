"""What a model name or folder holds, read before anything is built, and loading that refuses incomplete weights.

Every command that loads a saved model asks here first (`require_model_kind`): `config.json`'s `model_type`,
the weight files beside it (or a reference localiser's `localizer.json`) say whether the folder holds a CadMtl
multi-task model, a patch-memory anomaly scorer, an anomaly learner, a reference localiser, a DINOv3 (or other
transformers) backbone, or no model at all. A command given a kind it does not serve stops with one line that names
the folder, what it holds and the command that serves it:

    outputs/ad/model holds a patch-memory anomaly scorer, not a CadMtl multi-task model; use
    `cadmtl anomaly predict outputs/ad/model IMAGES --output-dir OUT`

A local path that does not exist is "no such model folder: PATH"; only a name shaped like `owner/name` goes to the
Hugging Face Hub (whose errors are one line too). `load_pretrained` then loads with `output_loading_info=True` and
raises on any missing, unexpected or mismatched weight: a model never runs with randomly initialised parts.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ANOMALY_LEARNER",
    "ANOMALY_MODEL_KINDS",
    "BACKBONE",
    "CADMTL",
    "LOCALIZER",
    "LOCALIZER_FILE",
    "NO_MODEL",
    "NO_WEIGHTS",
    "OTHER_MODEL",
    "PATCH_MEMORY",
    "WEIGHT_FILES",
    "ModelInfo",
    "ModelKind",
    "ModelLoadError",
    "check_loading_info",
    "inspect_model",
    "is_hub_id",
    "load_pretrained",
    "require_model_kind",
]

CONFIG_FILE = "config.json"
LOCALIZER_FILE = "localizer.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# owner/name as the Hub spells repo ids: one slash, no leading "." or "/" (those are local paths).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelLoadError(ValueError):
    """A model the command cannot serve (missing, of another kind, without or with mismatched weights); its message
    is one line for the user, and the commands print it and exit 2."""


@dataclass(frozen=True)
class ModelKind:
    """A kind of saved model: `holds` completes "PATH holds ...", `advice` (with `{path}`) says what to do with it."""

    name: str
    holds: str
    advice: str


CADMTL = ModelKind(
    "cadmtl", "a CadMtl multi-task model", "use `cadmtl predict {path} IMAGES --output-dir OUT`"
)
PATCH_MEMORY = ModelKind(
    "patch_memory",
    "a patch-memory anomaly scorer",
    "use `cadmtl anomaly predict {path} IMAGES --output-dir OUT`",
)
ANOMALY_LEARNER = ModelKind(
    "anomaly_learner", "an anomaly learner", "use `cadmtl anomaly predict {path} IMAGES --output-dir OUT`"
)
LOCALIZER = ModelKind(
    "localizer",
    "a reference localiser",
    "use `CADMTL_REFERENCE_MODEL={path} python app.py` or `cadmtl export onnx {path} OUT`",
)
BACKBONE = ModelKind(
    "backbone",
    "a DINOv3 backbone",
    "fit a scorer on it with `cadmtl anomaly fit REPO --config CONFIG --backbone {path} --output-dir OUT`",
)
OTHER_MODEL = ModelKind(
    "other", "a transformers model", "cadmtl serves CadMtl, anomaly and reference-localiser models"
)
NO_WEIGHTS = ModelKind(
    "no_weights",
    "no model weights (a config.json without model.safetensors)",
    "pass the model folder a run saved (OUTPUT_DIR/model)",
)
NO_MODEL = ModelKind(
    "no_model",
    "no saved model (no config.json)",
    "pass the model folder a run saved (OUTPUT_DIR/model)",
)
ANOMALY_MODEL_KINDS = (PATCH_MEMORY, ANOMALY_LEARNER)
# config.json's model_type -> kind; the anomaly types are those of modeling_cadmtl_anomaly's configurations.
MODEL_TYPE_KINDS = {
    "cadmtl": CADMTL,
    "cadmtl_patch_memory": PATCH_MEMORY,
    "cadmtl_anomaly_learner": ANOMALY_LEARNER,
    "dinov3_vit": BACKBONE,
    "dinov3_convnext": BACKBONE,
}


@dataclass(frozen=True)
class ModelInfo:
    """What `name` holds: its kind, `config.json`'s model_type (None without one), and where it was found."""

    name: str
    kind: ModelKind
    model_type: str | None = None
    on_hub: bool = False

    @property
    def holds(self) -> str:
        if self.kind is OTHER_MODEL and self.model_type:
            return f"a {self.model_type} model (transformers)"
        if self.kind is BACKBONE and self.model_type and not self.model_type.startswith("dinov3"):
            return f"a {self.model_type} backbone"
        return self.kind.holds

    def wrong_kind_message(self, wanted: tuple[ModelKind, ...]) -> str:
        """One line: the folder, what it holds, what the command wanted and what serves this folder instead."""
        holds = ", ".join(kind.holds for kind in wanted[:-1])
        holds = f"{holds} or {wanted[-1].holds}" if holds else wanted[-1].holds
        return f"{self.name} holds {self.holds}, not {holds}; {self.kind.advice.format(path=self.name)}"


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name` is shaped like a Hub repo id (`owner/name`) and is not a local path."""
    text = str(name)
    return bool(HUB_ID.match(text)) and not Path(text).exists()


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _kind_of_config(config: dict[str, Any]) -> tuple[ModelKind, str | None]:
    model_type = config.get("model_type")
    if model_type in MODEL_TYPE_KINDS:
        return MODEL_TYPE_KINDS[model_type], model_type
    if model_type and model_type.endswith("_backbone"):  # a transformers backbone (`timm_backbone`, ...)
        return BACKBONE, model_type
    return OTHER_MODEL, model_type


def _hub_config(name: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    errors: tuple[type[BaseException], ...] = (OSError, ValueError, EntryNotFoundError)
    try:
        import httpx

        errors += (httpx.HTTPError,)
    except ImportError:  # an older huggingface_hub on requests: its errors are OSErrors
        pass
    try:
        return json.loads(Path(hf_hub_download(name, CONFIG_FILE)).read_text())
    except errors as error:
        raise ModelLoadError(
            f"no such model folder: {name}, and the Hugging Face Hub gave no model {name} ({_one_line(error)})"
        ) from error


def inspect_model(name_or_path: str | os.PathLike) -> ModelInfo:
    """What `name_or_path` holds, read from its files only (nothing is built): a local folder, a
    `localizer.json`, or a Hub repo id shaped like `owner/name` (its config.json is fetched, or read from the cache).

    Raises:
        ModelLoadError: a local path that does not exist, or a Hub id the Hub cannot give.
    """
    name = str(name_or_path)
    path = Path(name)
    if path.is_file():
        if path.name == CONFIG_FILE:  # the config of a folder: the folder is meant
            return inspect_model(path.parent)
        try:
            settings = json.loads(path.read_text()) if path.suffix == ".json" else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            settings = None
        if isinstance(settings, dict) and "localizer" in settings:
            return ModelInfo(name, LOCALIZER)
        return ModelInfo(name, NO_MODEL)
    if path.is_dir():
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            return ModelInfo(name, LOCALIZER if (path / LOCALIZER_FILE).is_file() else NO_MODEL)
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ModelLoadError(f"{config_file} is not valid JSON ({_one_line(error)})") from error
        if not isinstance(config, dict):
            raise ModelLoadError(f"{config_file} is not a model configuration (a JSON object)")
        kind, model_type = _kind_of_config(config)
        if not any((path / weights).is_file() for weights in WEIGHT_FILES):
            return ModelInfo(name, NO_WEIGHTS, model_type)
        return ModelInfo(name, kind, model_type)
    if not is_hub_id(name):
        raise ModelLoadError(f"no such model folder: {name}")
    kind, model_type = _kind_of_config(_hub_config(name))
    return ModelInfo(name, kind, model_type, on_hub=True)


def require_model_kind(name_or_path: str | os.PathLike, *kinds: ModelKind) -> ModelInfo:
    """`inspect_model(name_or_path)` when it holds one of `kinds`, else a `ModelLoadError` with the one-line
    sentence of `ModelInfo.wrong_kind_message`."""
    info = inspect_model(name_or_path)
    if info.kind not in kinds:
        raise ModelLoadError(info.wrong_kind_message(kinds))
    return info


def _first(keys: Any, count: int = 3) -> str:
    names = sorted(str(key) for key in keys)
    return ", ".join(names[:count]) + (f", ... ({len(names)} in all)" if len(names) > count else "")


def check_loading_info(name: str, loading_info: dict[str, Any], holds: str) -> None:
    """Raise `ModelLoadError` naming the first keys when `from_pretrained(..., output_loading_info=True)` reports
    missing, unexpected or mismatched weights (transformers only warns: the model would run half random)."""
    problems = []
    if loading_info.get("missing_keys"):
        problems.append(f"missing {_first(loading_info['missing_keys'])}")
    if loading_info.get("unexpected_keys"):
        problems.append(f"unexpected {_first(loading_info['unexpected_keys'])}")
    if loading_info.get("mismatched_keys"):
        mismatched = [
            entry[0] if isinstance(entry, tuple) else entry for entry in loading_info["mismatched_keys"]
        ]
        problems.append(f"mismatched shapes {_first(mismatched)}")
    if loading_info.get("error_msgs"):
        problems.append(f"errors {_one_line(ValueError(loading_info['error_msgs'][0]))}")
    if problems:
        raise ModelLoadError(f"{name}: the weights do not fit {holds}: {'; '.join(problems)}")


class _WithoutLoadReport(logging.Filter):
    """Drops transformers' multi-line "LOAD REPORT" warning: `load_pretrained` raises one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def load_pretrained(model_class: Any, name_or_path: str | os.PathLike, holds: str, **kwargs: Any) -> Any:
    """`model_class.from_pretrained(name_or_path, **kwargs)`, refusing any missing, unexpected or mismatched
    weight (`holds` names what was expected in the message); a file, Hub or state-dict error becomes one line."""
    name = str(name_or_path)
    report_logger = logging.getLogger("transformers.modeling_utils")
    quiet = _WithoutLoadReport()
    report_logger.addFilter(quiet)
    try:
        model, loading_info = model_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    except (OSError, RuntimeError) as error:  # RuntimeError: transformers' "Error(s) in loading state_dict"
        reason = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise ModelLoadError(f"{name}: cannot load {holds} ({type(error).__name__}: {reason})") from error
    finally:
        report_logger.removeFilter(quiet)
    check_loading_info(name, loading_info, holds)
    return model
