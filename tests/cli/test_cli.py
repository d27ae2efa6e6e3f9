"""The `cadmtl` command: the command table, dispatch, every command's --help with an example and hyphenated flags,
the old spellings as hidden aliases, train pass-through."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cadmtl.cli import COMMANDS, Command, CommandGroup, command_summary, main, walk

GROUPS = [list(path) for path, command in walk() if isinstance(command, CommandGroup)]
ALL_COMMANDS = [list(path) for path, command in walk() if isinstance(command, Command)]
FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")


def test_the_table_holds_every_group_and_command() -> None:
    assert [" ".join(path) for path in GROUPS] == ["anomaly", "reference", "export", "data"]
    assert ["anomaly", "fit"] in ALL_COMMANDS and ["reference", "build-pairs"] in ALL_COMMANDS
    assert ["export", "onnx"] in ALL_COMMANDS and ["data", "convert"] in ALL_COMMANDS


@pytest.mark.parametrize("argv", [[], *GROUPS], ids=lambda argv: " ".join(["cadmtl", *argv]))
def test_every_group_help_lists_its_commands_with_an_example(argv: list[str], capsys) -> None:
    group = COMMANDS
    for name in argv:
        group = group.commands[name]
    prog = " ".join(["cadmtl", *argv])
    for help_argv in ([*argv, "--help"], argv):
        assert main(help_argv) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: {prog} COMMAND [ARGS...]   ({prog} COMMAND --help for its options)")
        for name, command in group.commands.items():
            assert f"  {name}  " in text and command_summary(command) in text and command.example in text
    assert (
        "  data       dataset tooling: make-demo | make-public | convert | synthesize | push" in usage_text()
    )


def usage_text() -> str:
    return COMMANDS.usage("cadmtl")


def test_adding_a_command_is_one_row(capsys) -> None:
    """A new command of a group is one row of its table: dispatch, the group's --help and the top level's list
    follow."""
    anomaly = COMMANDS.commands["anomaly"]
    row = Command("cadmtl.export.command:onnx_main", "a new command", "cadmtl anomaly new MODEL OUT")
    anomaly.commands["new"] = row
    try:
        assert main(["anomaly", "--help"]) == 0
        assert "  new       a new command" in capsys.readouterr().out
        assert "fit | evaluate | predict | train | protocol | new" in usage_text()
        with pytest.raises(SystemExit):
            main(["anomaly", "new", "--help"])
        assert capsys.readouterr().out.startswith("usage: cadmtl export onnx")  # the row's main ran
    finally:
        del anomaly.commands["new"]


def test_an_unknown_command_is_a_clear_error(capsys) -> None:
    assert main(["fit"]) == 2
    assert "cadmtl: unknown command 'fit'" in capsys.readouterr().err
    for group in GROUPS:
        assert main([*group, "build"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"cadmtl {' '.join(group)}: unknown command 'build'")
        assert f"usage: cadmtl {' '.join(group)} COMMAND" in err


def _help(argv: list[str], capfd) -> str:
    """`cadmtl ARGV --help`'s output (a subprocess's too: `cadmtl train --help` prints the loop's)."""
    try:
        code = main([*argv, "--help"])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 0
    return capfd.readouterr().out


@pytest.mark.parametrize("argv", ALL_COMMANDS, ids=" ".join)
def test_every_command_help_names_itself_shows_an_example_and_hyphenated_flags(
    argv: list[str], capfd
) -> None:
    text = _help(argv, capfd)
    name = "cadmtl " + " ".join(argv)
    assert text.startswith(f"usage: {name}")
    # the usage line and an example (`anomaly train`'s shows its `accelerate launch -m` form)
    assert text.count(name) >= 2 or "example: accelerate launch -m" in text, f"{name} --help shows no example"
    assert "--out " not in text and "--out=" not in text
    flags = set(FLAG.findall(text))
    assert "--help" in flags
    underscored = sorted(flag for flag in flags if "_" in flag)
    if argv == ["train"]:
        # The training loop's argument dataclasses (HfArgumentParser) take both spellings and list both.
        assert "--max-steps" in flags and "--max_steps" in flags and "hyphens or underscores" in text
        underscored = [flag for flag in underscored if flag.replace("_", "-") not in flags]
    assert not underscored, f"{name} --help shows underscore flags {underscored}"


def _namespaces(parser: argparse.ArgumentParser, new: list[str], old: list[str]) -> None:
    assert parser.parse_args(old) == parser.parse_args(new)


def test_old_spellings_still_parse_to_the_same_namespace(capsys) -> None:
    """Renamed flags keep their old spelling as a hidden alias (for one release): same namespace, absent from
    --help."""
    from cadmtl.reference.pairs import build_parser as pairs_parser
    from dataset_scripts.convert import build_parser as convert_parser
    from dataset_scripts.synthesize import build_parser as synthesize_parser

    build_pairs = ["data/mini", "--config", "exterior_ad", "--split", "test"]
    args = pairs_parser().parse_args([*build_pairs, "--out", "data/pairs"])
    assert args == pairs_parser().parse_args([*build_pairs, "--output-dir", "data/pairs"])
    assert args.output_dir == Path("data/pairs")
    convert = ["coco", "annotations.json", "--config", "exterior_det", "--seed", "3"]
    _namespaces(convert_parser(), [*convert, "--output-dir", "repo"], [*convert, "--out", "repo"])
    synthesize = ["normal/", "--config", "exterior_seg", "--counts", "dent=2"]
    _namespaces(synthesize_parser(), [*synthesize, "--output-dir", "repo"], [*synthesize, "--out", "repo"])
    # Either spelling satisfies a required option; giving both is an error, and --help names only the new one.
    with pytest.raises(SystemExit):
        pairs_parser().parse_args(build_pairs)
    assert capsys.readouterr().err.endswith("error: one of the arguments --output-dir is required\n")
    with pytest.raises(SystemExit):
        pairs_parser().parse_args([*build_pairs, "--out", "a", "--output-dir", "b"])
    assert "not allowed with argument" in capsys.readouterr().err
    help_text = pairs_parser().format_help()
    assert "--output-dir OUTPUT_DIR" in help_text and "--out " not in help_text


def test_the_old_spellings_run_through_the_command(tmp_path: Path, capsys) -> None:
    out = tmp_path / "repo"
    normal = tmp_path / "normal"
    normal.mkdir()
    from PIL import Image

    for index in range(2):
        Image.new("RGB", (48, 40), (90 + index, 90, 90)).save(normal / f"n{index}.png")
    argv = [
        "data",
        "synthesize",
        str(normal),
        "--config",
        "exterior_seg",
        "--counts",
        "dent=2",
        "--no-progress",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    assert (out / "exterior_seg").is_dir()


def test_train_passes_every_argument_through_to_accelerate_launch(capsys) -> None:
    assert main(["train", "--dry-run", "--num-processes", "2", "--max_steps", "3", "--paradigm", "base"]) == 0
    command = capsys.readouterr().out.split()
    module = command.index("--module")
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[3:module] == ["--num_processes", "2"]
    # The loop of the installed package (no script file to find), then every training argument unchanged.
    assert command[module + 1] == "cadmtl.training.loop"
    assert command[module + 2 :] == ["--max_steps", "3", "--paradigm", "base"]


def test_data_commands_run_the_dataset_tooling(tmp_path: Path) -> None:
    out = tmp_path / "mini"
    assert main(["data", "make-demo", str(out), "--train", "4", "--validation", "2", "--test", "2"]) == 0
    assert (out / "README.md").exists() and (out / "exterior_seg").is_dir()


@pytest.mark.slow
def test_the_installed_console_script_and_python_m_alias(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("cadmtl")
    for command in ([str(script), "--help"], [sys.executable, "-m", "cadmtl", "--help"]):
        completed = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert completed.returncode == 0, completed.stderr
        assert "cadmtl train --config" in completed.stdout
    completed = subprocess.run(
        [str(script), "train", "--help"], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "usage: cadmtl train" in completed.stdout and "--max_steps" in completed.stdout
    assert "--max-steps" in completed.stdout


def test_the_readme_shows_the_current_help(capsys) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    main(["--help"])
    assert capsys.readouterr().out.rstrip() in readme
