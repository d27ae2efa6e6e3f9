"""Command-line options that several commands share, declared once.

Every `cadmtl` command (and the dataset tooling, which lives below `cadmtl` and imports nothing from it) adds
`--output-dir`, `--device`, `--batch-size`, `--threshold`, `--tile-size` / `--tile-overlap` and `--seed` through
these helpers, so each is spelled, typed and explained alike everywhere. Flags are hyphenated; a flag's old
spelling (`--out`, `--max_steps`, ...) stays accepted for one release as a hidden alias (`add_option(old=...)`):
it parses to the same destination and is absent from `--help`.

It also holds the one vocabulary of the CSV files that commands write scores to (`cadmtl predict`'s summary.csv,
`cadmtl anomaly evaluate / predict`'s scores.csv): `SCORE_COLUMNS`, and `ERROR_VERDICT` for an input that could
not be scored.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Every CSV of per-image scores has these columns (after the columns naming the image): the image-level anomaly
# score; the verdict: `OK` / `NG`, the model's status word where it cannot judge (`uncalibrated`, `uninformative`),
# empty where it gives no verdict, `error` where the input could not be scored; and that error's message
# (`ExceptionType: message`, empty when scored). An error row has an empty anomaly_score.
SCORE_COLUMNS = ("anomaly_score", "verdict", "error")
ERROR_VERDICT = "error"

# argparse.ArgumentParser or an argument group of one.
Parser = argparse.ArgumentParser | argparse._ArgumentGroup


def positive_int(text: str) -> int:
    """argparse `type=` for counts and sizes: an integer >= 1, or argparse's usage error naming the flag."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse `type=` for an integer >= 0 (where 0 switches something off)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def exit_status(
    run: Callable[[], object],
    user_errors: tuple[type[Exception], ...] = (FileNotFoundError, ValueError),
    prefix: str = "error",
    error_status: int = 2,
) -> int:
    """A command's exit status: what `run()` returns when that is an int, else 0; `error_status` with one
    `PREFIX: ...` line on stderr (no traceback) when it raises one of `user_errors` (a missing file, an unusable
    config or split). The dataset commands exit 1 on such errors, the model commands 2."""
    try:
        status = run()
    except user_errors as error:
        print(f"{prefix}: {error}", file=sys.stderr)
        return error_status
    return status if isinstance(status, int) else 0


def add_option(parser: Parser, flag: str, *, old: Sequence[str] = (), **kwargs: Any) -> argparse.Action:
    """`parser.add_argument(flag, **kwargs)`, plus each spelling in `old` as a hidden alias of it.

    A required option stays required, and satisfied by either spelling (a required group of the two)."""
    if not old:
        return parser.add_argument(flag, **kwargs)
    required = kwargs.pop("required", False)
    group = parser.add_mutually_exclusive_group(required=required)
    action = group.add_argument(flag, **kwargs)
    alias = {key: value for key, value in kwargs.items() if key not in ("help", "default", "metavar")}
    for spelling in old:
        group.add_argument(
            spelling, dest=action.dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **alias
        )
    return action


def add_output_dir_option(
    parser: Parser,
    help: str,
    *,
    required: bool = True,
    default: Path | str | None = None,
    old: Sequence[str] = (),
) -> argparse.Action:
    """`--output-dir DIR` (a `Path`): where a command writes its results."""
    return add_option(
        parser, "--output-dir", old=old, type=Path, required=required, default=default, help=help
    )


def add_device_option(
    parser: Parser, fallback: str = "CUDA when there is one, else the CPU", help: str | None = None
) -> argparse.Action:
    """`--device`: where the model runs; `fallback` says what the command picks without it."""
    return parser.add_argument(
        "--device",
        default=None,
        help=help or f'where the model runs: "cpu", "cuda", "cuda:1", "mps" (default: {fallback})',
    )


def add_batch_size_option(
    parser: Parser, default: int | None, help: str = "images per forward pass"
) -> argparse.Action:
    """`--batch-size N` (the default is named in the help unless it is None)."""
    return parser.add_argument("--batch-size", type=int, default=default, help=_with_default(help, default))


def add_threshold_option(parser: Parser, default: float | None, help: str) -> argparse.Action:
    """`--threshold X`: a score threshold (what it thresholds is the command's `help`)."""
    return parser.add_argument("--threshold", type=float, default=default, help=help)


def add_seed_option(parser: Parser, default: int = 0, help: str = "random seed") -> argparse.Action:
    """`--seed N`."""
    return parser.add_argument("--seed", type=int, default=default, help=_with_default(help, default))


def add_tile_options(parser: Parser, purpose: str) -> None:
    """`--tile-size` / `--tile-overlap`: high-resolution inspection by overlapping square tiles (pixels of the
    original image), their outputs merged over the whole image; `purpose` ends the `--tile-size` help (what the
    command does with them, and their default)."""
    parser.add_argument(
        "--tile-size",
        type=int,
        default=None,
        help=f"score overlapping square tiles of this many pixels of the original image (>= 32); {purpose}",
    )
    parser.add_argument(
        "--tile-overlap",
        type=int,
        default=None,
        help="pixels shared by neighbouring tiles (< --tile-size); default 0",
    )


def _with_default(help: str, default: object) -> str:
    return help if default is None else f"{help} (default {default})"
