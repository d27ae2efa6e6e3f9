"""Ctrl-C in any `cadmtl` command: one line, exit 130, no traceback; child jobs are stopped with their group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cadmtl import cli
from cadmtl.training.launch import run_child


@pytest.fixture(autouse=True)
def ctrl_c_as_on_a_terminal():
    """A shell starts background jobs (`pytest ... &`) with SIGINT ignored, which children inherit: these tests need
    Ctrl-C to behave as in a foreground terminal, whatever started the test run."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(monkeypatch, capsys) -> None:
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.Command, "load", lambda self: interrupted)
    assert cli.main(["data", "make-public", "out"]) == 130
    assert cli.main(["charts", "eval_results.json", "--output-dir", "charts"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted; rerun to continue\n" * 2 and captured.out == ""


@pytest.mark.skipif(os.name != "posix", reason="process groups and SIGINT are POSIX")
def test_run_child_stops_the_whole_child_group_on_ctrl_c(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time\n"
        "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{grandchild.pid}}')\n"
        "time.sleep(120)\n"
    )
    started = time.monotonic()

    def interrupt_when_started() -> None:
        while not pids.exists() or len(pids.read_text().split()) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends to the foreground process (this one)

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_child([sys.executable, "-c", script], stop_timeout=10)
    assert time.monotonic() - started < 60
    child, grandchild = map(int, pids.read_text().split())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # stopped and reaped
    for _ in range(100):  # the worker the child started went with its group
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the child's own subprocess survived Ctrl-C")


def _alive(pid: int) -> bool:
    """Running (a zombie that no init process reaps yet counts as ended)."""
    status = Path(f"/proc/{pid}/status")
    if status.parent.parent.is_dir() and Path("/proc/self").exists():
        try:
            return "\tZ" not in next(
                line for line in status.read_text().splitlines() if line.startswith("State:")
            )
        except (FileNotFoundError, ProcessLookupError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="SIGINT delivery as on a terminal")
def test_ctrl_c_in_a_real_command_prints_no_traceback(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    process = subprocess.Popen(
        [sys.executable, "-m", "cadmtl", "data", "make-demo", str(out), "--train", "400"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not an inherited SIG_IGN
    )
    deadline = time.monotonic() + 240
    while not out.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert out.exists(), "make-demo never started writing"
    time.sleep(0.5)  # nine configs of 400 rows to go: still working
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr.rstrip().splitlines()[-1] == "interrupted; rerun to continue"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
