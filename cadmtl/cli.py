"""The `cadmtl` command: one entry point for every job (`cadmtl COMMAND --help` shows each one's example).

Subcommands are imported only when run, so `cadmtl --help` is instant and a job loads only what it needs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand: where its `main(argv) -> int` lives, one line of help, one example."""

    target: str  # "package.module:function"
    summary: str
    example: str

    def load(self) -> Callable[[Sequence[str]], int]:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)


COMMANDS: dict[str, Command] = {
    "train": Command(
        "cadmtl.training.launch:main",
        "train a model: accelerate launch train_accelerate.py with every argument passed through",
        "cadmtl train --config configs/public_smoke.yaml --max_steps 100",
    ),
    "evaluate": Command(
        "cadmtl.evaluation.command:main",
        "evaluate a model on dataset configs (paper-shaped tables), or compare runs",
        "cadmtl evaluate outputs/cadmtl-demo/model data/cad100k-mini --split test --output-dir eval/",
    ),
    "predict": Command(
        "cadmtl.pictures.command:predict_main",
        "run a model on images and write prediction overlays",
        "cadmtl predict outputs/cadmtl-demo/model photos/ --output-dir overlays/",
    ),
    "charts": Command(
        "cadmtl.pictures.command:charts_main",
        "per-class charts and confusion matrices of an eval_results.json",
        "cadmtl charts outputs/cadmtl-demo/eval_results.json --output-dir charts/",
    ),
    "anomaly": Command(
        "cadmtl.anomaly.command:main",
        "normal-only anomaly detection: fit | evaluate | predict | train on *_ad configs",
        "cadmtl anomaly fit data/cad100k-mini --config exterior_ad --output-dir outputs/ad --backbone tiny",
    ),
    "reference": Command(
        "cadmtl.reference.command:main",
        "reference-guided localisation: build-pairs | localize | evaluate | grpo | zero-shot",
        "cadmtl reference build-pairs data/cad100k-mini --config exterior_ad --split test --out data/pairs",
    ),
    "protocol": Command(
        "cadmtl.protocol:main",
        "the public-benchmark protocol: single-task vs base vs adaptive vs PCGrad / CAGrad / Aligned-MTL / FAMO over seeds",
        "cadmtl protocol --setting cpu",
    ),
    "export": Command(
        "cadmtl.export.command:main",
        "export a model for serving: ONNX graph + processor + config (onnxruntime predictor)",
        "cadmtl export onnx outputs/cadmtl-demo/model onnx/",
    ),
}

DATA_COMMANDS: dict[str, Command] = {
    "make-demo": Command(
        "dataset_scripts.make_demo:main",
        "build the cad100k-mini demo dataset (all configs, deterministic)",
        "cadmtl data make-demo data/cad100k-mini",
    ),
    "make-public": Command(
        "dataset_scripts.make_public:main",
        "build the public benchmark repo (parts_cls/det/seg) from ../shared/data",
        "cadmtl data make-public outputs/public-benchmark --data ../shared/data",
    ),
    "convert": Command(
        "dataset_scripts.convert:main",
        "add a converted config split (coco, yolo, folders, masks, mvtec, magnetic_tile, ad_folders)",
        "cadmtl data convert coco annotations.json --out REPO --config exterior_det --mapping map.yaml",
    ),
    "synthesize": Command(
        "dataset_scripts.synthesize:main",
        "add synthetic defects painted on normal images",
        "cadmtl data synthesize normal/ --out REPO --config exterior_seg --counts corrosion=20,dent=10",
    ),
    "push": Command(
        "dataset_scripts.push:main",
        "upload a dataset repo folder to the Hugging Face Hub",
        "cadmtl data push data/cad100k-mini --repo-id ORG/cad100k-mini",
    ),
}


def _usage(prefix: str, commands: dict[str, Command], groups: dict[str, str]) -> str:
    width = max(len(name) for name in [*commands, *groups])
    lines = [
        f"usage: {prefix} COMMAND [ARGS...]   ({prefix} COMMAND --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in commands.items()]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in groups.items()]
    lines += ["", "examples:"] + [f"  {command.example}" for command in commands.values()]
    return "\n".join(lines)


def usage() -> str:
    return _usage("cadmtl", COMMANDS, {"data": "dataset tooling: " + " | ".join(DATA_COMMANDS)})


def data_usage() -> str:
    return _usage("cadmtl data", DATA_COMMANDS, {})


def _dispatch(argv: list[str], commands: dict[str, Command], text: Callable[[], str], prefix: str) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(text())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "data" and commands is COMMANDS:
        return _dispatch(rest, DATA_COMMANDS, data_usage, "cadmtl data")
    if name not in commands:
        print(f"{prefix}: unknown command {name!r}\n\n{text()}", file=sys.stderr)
        return 2
    return commands[name].load()(rest) or 0


INTERRUPTED = "interrupted; rerun to continue"


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; Ctrl-C ends any of them with one line on stderr and exit code 130 (128 + SIGINT)."""
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv), COMMANDS, usage, "cadmtl")
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
