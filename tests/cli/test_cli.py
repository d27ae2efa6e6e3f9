"""The `cadmtl` command: the command list, dispatch, every subcommand's --help with an example, train pass-through."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cadmtl.cli import COMMANDS, DATA_COMMANDS, main

ALL_COMMANDS = [[name] for name in COMMANDS] + [["data", name] for name in DATA_COMMANDS]


def test_help_lists_every_command_with_an_example(capsys) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name, command in COMMANDS.items():
        assert f"  {name} " in text and command.example in text
    assert "data" in text and "make-demo | make-public | convert | synthesize | push" in text
    assert main([]) == 0 and "usage: cadmtl COMMAND" in capsys.readouterr().out
    assert main(["data", "--help"]) == 0
    data_text = capsys.readouterr().out
    assert all(command.example in data_text for command in DATA_COMMANDS.values())


def test_an_unknown_command_is_a_clear_error(capsys) -> None:
    assert main(["fit"]) == 2
    assert "cadmtl: unknown command 'fit'" in capsys.readouterr().err
    assert main(["data", "build"]) == 2
    assert "cadmtl data: unknown command 'build'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", ALL_COMMANDS, ids=" ".join)
def test_every_subcommand_help_names_itself_and_shows_an_example(argv: list[str], capsys) -> None:
    if argv == ["train"]:
        pytest.skip(
            "cadmtl train --help also prints the training loop's --help (a subprocess): see the slow test"
        )
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    name = "cadmtl " + " ".join(argv)
    assert text.startswith(f"usage: {name}")
    assert text.count(name) >= 2, f"{name} --help shows no example:\n{text}"  # the usage line and an example


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


def test_the_readme_shows_the_current_help(capsys) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    main(["--help"])
    assert capsys.readouterr().out.rstrip() in readme
