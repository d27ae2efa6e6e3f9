"""`cadmtl train`: run the training loop under `accelerate launch`, passing every training argument through.

    cadmtl train                                          # the built-in CPU demo, like `accelerate launch train_accelerate.py`
    cadmtl train --config configs/cad100k_dinov3_vitb16_adaptive.yaml --max-steps 20000
    cadmtl train --num-processes 8 --accelerate-config configs/accelerate/multi_gpu.yaml --paradigm base

It runs `accelerate launch -m cadmtl.training.loop ...`: the loop of the installed package, the same one the
repo's `train_accelerate.py` calls, so both give the same run. Options of this launcher come first; everything
else (`--max-steps`, `--config`, ...) goes to the loop unchanged. The loop's options are the transformers-style
argument dataclasses, so each has two spellings that both work: `--max-steps` or `--max_steps` (as in
`accelerate launch train_accelerate.py --max_steps 100`). `cadmtl train --help` lists them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence

TRAINING_MODULE = "cadmtl.training.loop"


def run_child(command: Sequence[str], stop_timeout: float = 30.0) -> int:
    """Run a job (training under `accelerate launch`, ...) and return its exit code.

    The child runs in its own process group, so Ctrl-C reaches only this process: it then stops the whole group with
    SIGTERM (SIGKILL after `stop_timeout` seconds), which ends the child and its workers without a traceback each,
    and raises `KeyboardInterrupt` here for `cadmtl` to report in one line. Checkpoints are written atomically, so
    a stopped run resumes from its last one.
    """
    process = subprocess.Popen(list(command), start_new_session=os.name == "posix")
    try:
        return process.wait()
    except KeyboardInterrupt:
        _stop(process, stop_timeout)
        raise


def _stop(process: subprocess.Popen, timeout: float) -> None:
    if os.name != "posix":
        process.terminate()
        process.wait()
        return
    for sent in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sent)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons, so the next in-process run can make its own `Accelerator`
    (another mixed precision, another gradient accumulation); Accelerate refuses that otherwise."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    GradientState._reset_state()


def launch_command(launch_args: Sequence[str], train_args: Sequence[str]) -> list[str]:
    """The `accelerate launch` command line of the training module (through this Python, so the right environment
    runs it)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch_args,
        "--module",
        TRAINING_MODULE,
        *train_args,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cadmtl train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    parser.add_argument(
        "-h", "--help", action="store_true", help="Show this help and the training arguments."
    )
    parser.add_argument(
        "--num-processes", type=int, default=None, help="Processes (GPUs) for accelerate launch."
    )
    parser.add_argument(
        "--accelerate-config", default=None, help="An Accelerate config file (configs/accelerate/)."
    )
    parser.add_argument(
        "--launch-args",
        default="",
        help='Any other `accelerate launch` options, one string: "--mixed-precision bf16".',
    )
    parser.add_argument("--dry-run", action="store_true", help="Print the command instead of running it.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, train_args = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        print(
            "\ntraining arguments (python -m cadmtl.training.loop --help; each works with hyphens or underscores, "
            "--max-steps or --max_steps):\n"
        )
        return subprocess.call([sys.executable, "-m", TRAINING_MODULE, "--help"])
    launch_args: list[str] = []
    if args.accelerate_config:
        launch_args += ["--config_file", args.accelerate_config]
    if args.num_processes:
        launch_args += ["--num_processes", str(args.num_processes)]
    launch_args += shlex.split(args.launch_args)
    command = launch_command(launch_args, train_args)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    return run_child(command)
