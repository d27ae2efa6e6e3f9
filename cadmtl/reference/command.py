"""`cadmtl reference`: reference-guided localisation jobs, one subcommand per module.

Each subcommand is a ``module:function`` taking ``argv`` (its own argparse, ``prog="cadmtl reference NAME"``),
imported only when run. To add one (e.g. the GRPO trainer in ``cadmtl/reference/grpo.py``), add a line to
:data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> ("module:function", one line of help, one example)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "build-pairs": (
        "cadmtl.reference.pairs:main",
        "pair every query of an _ad split with a re-photographed normal reference (or synthetic defects)",
        "cadmtl reference build-pairs data/cad100k-mini --config exterior_ad --split test --out data/pairs",
    ),
    "localize": (
        "cadmtl.reference.localize:main",
        "the training-free patch-difference localiser on every pair (threshold from a calibration split)",
        "cadmtl reference localize tiny data/pairs --split test --output-dir outputs/reference-tiny",
    ),
    "evaluate": (
        "cadmtl.reference.evaluate:main",
        "DifferAD's protocol on predictions.jsonl: mIoU, Acc@0.3/0.5, F1, per category and misalignment",
        "cadmtl reference evaluate outputs/reference-tiny data/pairs --split test",
    ),
    "grpo": (
        "cadmtl.reference.grpo:main",
        "GRPO fine-tuning of a vision-language model on pairs (TRL; DifferAD-R1's prompt and rewards)",
        "cadmtl reference grpo --model tiny-random --dataset data/pairs --output-dir outputs/grpo --max-steps 2",
    ),
    "zero-shot": (
        "cadmtl.reference.grpo:zero_shot_main",
        "answer every pair with a vision-language model (same prompt and parser); writes predictions.jsonl",
        "cadmtl reference zero-shot --model tiny-random --dataset data/pairs --split test --output-dir outputs/vlm",
    ),
}


def _parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in SUBCOMMANDS)
    commands = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary, _) in SUBCOMMANDS.items())
    examples = "\n".join(f"  {example}" for _, _, example in SUBCOMMANDS.values())
    return argparse.ArgumentParser(
        prog="cadmtl reference",
        usage="cadmtl reference COMMAND [ARGS...]   (cadmtl reference COMMAND --help for its options)",
        description=f"Reference-guided defect localisation.\n\ncommands:\n{commands}",
        epilog=f"examples:\n{examples}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv:
        parser.print_help()
        return 0
    if argv[0] in ("-h", "--help"):
        parser.parse_args(["--help"])  # prints the help and exits 0, as every other subcommand's --help
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        parser.print_usage(sys.stderr)
        print(
            f"cadmtl reference: unknown command {name!r}; choose from {', '.join(SUBCOMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module, _, function = SUBCOMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), function)(rest) or 0
