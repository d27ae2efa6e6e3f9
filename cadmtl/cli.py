"""The `cadmtl` command: one entry point for every job (`cadmtl COMMAND --help` shows each one's example).

One table (`COMMANDS`) holds every command and group (`cadmtl anomaly`, `reference`, `export`, `data`), each a
`module:main(argv) -> int` with its one line of help and an example; groups nest the same table, so every
`cadmtl GROUP --help` lists its commands alike and a new command is one row. Commands are imported only when run,
so every `--help` of the tables is instant and a job loads only what it needs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Command:
    """A command: where its `main(argv) -> int` lives, one line of help, one example."""

    target: str  # "package.module:function"
    summary: str
    example: str

    def load(self) -> Callable[[Sequence[str]], int]:
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)

    def run(self, argv: list[str], prog: str) -> int:
        """Run it on `argv` (its parser names itself `prog`, the same as `CommandGroup.run` is called with)."""
        return self.load()(argv) or 0


@dataclass(frozen=True)
class CommandGroup:
    """A group of commands (`cadmtl anomaly fit ...`): a table like the top level's, dispatched the same way.
    A new command of a group is one row in its table."""

    summary: str
    commands: dict[str, Command | CommandGroup] = field(default_factory=dict)

    @property
    def example(self) -> str:
        return next(iter(self.commands.values())).example

    def usage(self, prog: str) -> str:
        width = max(len(name) for name in self.commands)
        lines = [f"usage: {prog} COMMAND [ARGS...]   ({prog} COMMAND --help for its options)", ""]
        if prog != "cadmtl":
            lines += [f"{self.summary}.", ""]
        lines += ["commands:"]
        lines += [f"  {name:<{width}}  {command_summary(command)}" for name, command in self.commands.items()]
        lines += ["", "examples:"]
        lines += [f"  {command.example}" for command in self.commands.values()]
        return "\n".join(lines)

    def run(self, argv: list[str], prog: str) -> int:
        if not argv or argv[0] in ("-h", "--help"):
            print(self.usage(prog))
            return 0
        name, rest = argv[0], argv[1:]
        if name not in self.commands:
            print(f"{prog}: unknown command {name!r}\n\n{self.usage(prog)}", file=sys.stderr)
            return 2
        return self.commands[name].run(rest, f"{prog} {name}")


def command_summary(command: Command | CommandGroup) -> str:
    """The one line a command gets in its group's help (a group's names its commands)."""
    if isinstance(command, CommandGroup):
        return f"{command.summary}: {' | '.join(command.commands)}"
    return command.summary


COMMANDS = CommandGroup(
    "cad-mtl: multi-task car-defect inspection, anomaly detection and reference-guided localisation",
    {
        "train": Command(
            "cadmtl.training.launch:main",
            "train a model: accelerate launch train_accelerate.py with every argument passed through",
            "cadmtl train --config configs/public_smoke.yaml --max-steps 100",
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
        "anomaly": CommandGroup(
            "normal-only anomaly detection on *_ad configs",
            {
                "fit": Command(
                    "cadmtl.anomaly.command:fit_main",
                    "build the patch-memory scorer from normal images and calibrate it",
                    "cadmtl anomaly fit data/cad100k-mini --config exterior_ad --output-dir outputs/ad --backbone tiny",
                ),
                "evaluate": Command(
                    "cadmtl.anomaly.command:evaluate_main",
                    "image / pixel AUROC, AUPRO, F1-max, pixel AP on a split, scores.csv, optional maps",
                    "cadmtl anomaly evaluate outputs/ad/model data/cad100k-mini --config exterior_ad --split test "
                    "--output-dir outputs/ad/eval",
                ),
                "predict": Command(
                    "cadmtl.anomaly.command:predict_main",
                    "heat-map PNGs and scores.csv with the OK / NG verdict for image files and folders",
                    "cadmtl anomaly predict outputs/ad/model photos/ --output-dir outputs/ad/predict",
                ),
                "train": Command(
                    "cadmtl.anomaly.command:train_main",
                    "train the from-scratch multi-task learner under accelerate launch",
                    "cadmtl anomaly train data/cad100k-mini --config exterior_ad --output-dir outputs/learner",
                ),
                "protocol": Command(
                    "cadmtl.anomaly.learner_protocol:main",
                    "leave-one-type-out evaluation of the learner: settings chosen on the other defect types",
                    "cadmtl anomaly protocol data/tile --config tile_ad --output-dir outputs/learner-loto --seeds 0 1 2",
                ),
            },
        ),
        "reference": CommandGroup(
            "reference-guided localisation",
            {
                "build-pairs": Command(
                    "cadmtl.reference.pairs:main",
                    "pair every query of an _ad split with a re-photographed normal reference (or synthetic defects)",
                    "cadmtl reference build-pairs data/cad100k-mini --config exterior_ad --split test "
                    "--output-dir data/pairs",
                ),
                "localize": Command(
                    "cadmtl.reference.localize_pairs:main",
                    "the training-free patch-difference localiser on every pair (threshold from a calibration split)",
                    "cadmtl reference localize tiny data/pairs --split test --output-dir outputs/reference-tiny",
                ),
                "evaluate": Command(
                    "cadmtl.reference.evaluate:main",
                    "DifferAD's protocol on predictions.jsonl: mIoU, Acc@0.3/0.5, F1, per category and misalignment",
                    "cadmtl reference evaluate outputs/reference-tiny data/pairs --split test",
                ),
                "grpo": Command(
                    "cadmtl.reference.command:grpo_main",
                    "GRPO fine-tuning of a vision-language model on pairs (TRL; DifferAD-R1's prompt and rewards)",
                    "cadmtl reference grpo --model tiny-random --dataset data/pairs --output-dir outputs/grpo "
                    "--max-steps 2",
                ),
                "zero-shot": Command(
                    "cadmtl.reference.command:zero_shot_main",
                    "answer every pair with a vision-language model (same prompt and parser); writes predictions.jsonl",
                    "cadmtl reference zero-shot --model tiny-random --dataset data/pairs --split test "
                    "--output-dir outputs/vlm",
                ),
            },
        ),
        "protocol": Command(
            "cadmtl.protocol:main",
            "the public-benchmark protocol: single-task vs base vs adaptive vs PCGrad / CAGrad / Aligned-MTL / FAMO over seeds",
            "cadmtl protocol --setting cpu",
        ),
        "export": CommandGroup(
            "export a model for serving",
            {
                "onnx": Command(
                    "cadmtl.export.command:onnx_main",
                    "ONNX graph + processor + config (onnxruntime predictor)",
                    "cadmtl export onnx outputs/cadmtl-demo/model onnx/",
                ),
            },
        ),
        "data": CommandGroup(
            "dataset tooling",
            {
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
                    "cadmtl data convert coco annotations.json --output-dir REPO --config exterior_det "
                    "--mapping map.yaml",
                ),
                "synthesize": Command(
                    "dataset_scripts.synthesize:main",
                    "add synthetic defects painted on normal images",
                    "cadmtl data synthesize normal/ --output-dir REPO --config exterior_seg "
                    "--counts corrosion=20,dent=10",
                ),
                "push": Command(
                    "dataset_scripts.push:main",
                    "upload a dataset repo folder to the Hugging Face Hub",
                    "cadmtl data push data/cad100k-mini --repo-id ORG/cad100k-mini",
                ),
            },
        ),
    },
)


def walk(
    group: CommandGroup = COMMANDS, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Command | CommandGroup]]:
    """Every group and command under `group`, with its path of names (`("anomaly", "fit")`), parents first."""
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, CommandGroup):
            yield from walk(command, (*prefix, name))


def usage() -> str:
    return COMMANDS.usage("cadmtl")


INTERRUPTED = "interrupted; rerun to continue"


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; Ctrl-C ends any of them with one line on stderr and exit code 130 (128 + SIGINT)."""
    try:
        return COMMANDS.run(list(sys.argv[1:] if argv is None else argv), "cadmtl")
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
