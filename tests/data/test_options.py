"""The shared command options (`dataset_scripts/options.py`): one spelling, hidden old spellings, same help."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dataset_scripts.options import (
    ERROR_VERDICT,
    SCORE_COLUMNS,
    add_batch_size_option,
    add_device_option,
    add_option,
    add_output_dir_option,
    add_seed_option,
    add_tile_options,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cadmtl job")
    add_output_dir_option(parser, "where results go", old=["--out"])
    add_option(parser, "--max-steps", old=["--max_steps"], type=int, default=5, help="steps")
    add_option(parser, "--dry-run", old=["--dry_run"], action="store_true", help="print only")
    add_batch_size_option(parser, 8)
    add_seed_option(parser, 3)
    add_device_option(parser)
    add_tile_options(parser, "default: none")
    return parser


def test_old_spellings_parse_to_the_same_namespace_and_keep_defaults() -> None:
    new = _parser().parse_args(["--output-dir", "o", "--max-steps", "2", "--dry-run"])
    old = _parser().parse_args(["--out", "o", "--max_steps", "2", "--dry_run"])
    assert new == old
    assert vars(new) == {
        "output_dir": Path("o"),
        "max_steps": 2,
        "dry_run": True,
        "batch_size": 8,
        "seed": 3,
        "device": None,
        "tile_size": None,
        "tile_overlap": None,
    }
    defaults = _parser().parse_args(["--out", "o"])
    assert defaults.max_steps == 5 and defaults.dry_run is False


def test_help_shows_only_the_hyphenated_spelling() -> None:
    text = _parser().format_help()
    assert "--output-dir OUTPUT_DIR" in text and "--max-steps MAX_STEPS" in text and "--dry-run" in text
    assert "--out " not in text and "_" not in "".join(
        line.split()[0] for line in text.splitlines() if line.strip()
    )
    assert "images per forward pass (default 8)" in text and "random seed (default 3)" in text


def test_a_required_option_is_satisfied_by_either_spelling_but_not_both(capsys) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args([])
    assert capsys.readouterr().err.endswith("error: one of the arguments --output-dir is required\n")
    with pytest.raises(SystemExit):
        _parser().parse_args(["--out", "a", "--output-dir", "b"])
    assert "argument --output-dir: not allowed with argument --out" in capsys.readouterr().err


def test_the_score_csv_vocabulary() -> None:
    assert SCORE_COLUMNS == ("anomaly_score", "verdict", "error") and ERROR_VERDICT == "error"
