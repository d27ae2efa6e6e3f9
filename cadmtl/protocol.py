"""The paper's public-benchmark protocol: single-task vs. multi-task methods, same per-task budget, several seeds.

    cadmtl protocol --setting smoke              # CPU, minutes: checks the whole pipeline
    cadmtl protocol --setting cpu                # CPU, about an hour: a small from-scratch ViT on all the public data
    cadmtl protocol --setting cpu-pretrained     # CPU, <= 150 min: ImageNet EfficientNet-Lite0 fine-tuned (pretrained extra)
    cadmtl protocol --setting full --seeds 0 1 2 \
        --launch-args "--config-file configs/accelerate/multi_gpu.yaml"

1. Builds the public benchmark repo from ../shared/data (`dataset_scripts.make_public`) if it is missing.
2. For every seed trains one model per method with `train_accelerate.py` (through `accelerate launch`): one
   single-task model per task (classification on parts_cls, detection on parts_det, segmentation on parts_seg),
   the base multi-task model (round robin, equal weights), the adaptive one (CoBa + task scheduler), and the
   task-weighting methods PCGrad, CAGrad, Aligned-MTL and FAMO (`--weighting NAME --all-tasks-per-step`).
3. Same budget per task: a single-task model trains `steps_per_task` optimizer steps; base and adaptive sample one
   task per step, so they train 3x as many (each task gets `steps_per_task` steps, in expectation for adaptive);
   the weighting methods run every task in every step, so they train `steps_per_task` steps.
4. Evaluates each on the test splits and writes `comparison.md` / `comparison.json`: classification Acc@1,
   detection AP and segmentation mIoU per method, mean ± std over seeds (Table 1 of the paper).

Runs that already finished (their eval_results.json exists) are reused, so an interrupted protocol continues.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from cadmtl.evaluation.reporting import comparison_table, load_results, task_summary
from cadmtl.training.launch import launch_command, run_child
from dataset_scripts.options import add_output_dir_option
from dataset_scripts.schema import TASKS

logger = logging.getLogger("cadmtl.protocol")
REPO_ROOT = Path(__file__).resolve().parents[1]


class Setting(NamedTuple):
    config: str
    steps_per_task: int
    limit: int | None  # examples per split of the public repo (None: all)
    seeds: list[int]
    methods: tuple[str, ...] | None = None  # None: every method


SETTINGS = {
    "smoke": Setting("configs/public_smoke.yaml", 4, 24, [0]),
    "cpu": Setting("configs/public_cpu.yaml", 500, None, [0, 1, 2]),
    # ImageNet EfficientNet-Lite0 (the `pretrained` extra) fine-tuned: Single / Base / Adaptive, 3 seeds, whole
    # public data in <= 150 minutes on a 2-core CPU (the gradient methods: `--methods pcgrad ...` when time allows).
    "cpu-pretrained": Setting(
        "configs/public_cpu_pretrained.yaml",
        250,
        None,
        [0, 1, 2],
        ("single-cls", "single-det", "single-seg", "base", "adaptive"),
    ),
    "full": Setting("configs/public_dinov3_vits16plus.yaml", 3000, None, [0, 1, 2]),
}
# method: (training arguments, optimizer steps in units of steps_per_task)
METHODS: dict[str, tuple[list[str], int]] = {
    "single-cls": (["--paradigm", "single", "--single-task", "cls"], 1),
    "single-det": (["--paradigm", "single", "--single-task", "det"], 1),
    "single-seg": (["--paradigm", "single", "--single-task", "seg"], 1),
    "base": (["--paradigm", "base"], len(TASKS)),
    "adaptive": (["--paradigm", "adaptive"], len(TASKS)),
    **{
        name: (["--paradigm", "base", "--weighting", name, "--all-tasks-per-step"], 1)
        for name in ("pcgrad", "cagrad", "aligned_mtl", "famo")
    },
}
# Table rows: name -> the multi-task method it reports ("Single" takes each task from its single-task model).
ROWS = {
    "Base": "base",
    "Adaptive": "adaptive",
    "PCGrad": "pcgrad",
    "CAGrad": "cagrad",
    "Aligned-MTL": "aligned_mtl",
    "FAMO": "famo",
}


def build_public_repo(dataset_dir: Path, data: Path, limit: int | None) -> None:
    if (dataset_dir / "README.md").exists():
        return
    command = [sys.executable, "-m", "dataset_scripts.make_public", str(dataset_dir), "--data", str(data)]
    if limit:
        command += ["--limit", str(limit)]
    logger.info("building the public benchmark repo: %s", shlex.join(command))
    if code := run_child(command):  # Ctrl-C stops the run quietly (cadmtl prints one line)
        raise subprocess.CalledProcessError(code, command)


def train(
    run_dir: Path, config: Path, method: str, seed: int, steps: int, dataset_dir: Path, launch: list[str]
) -> Path:
    """One training run (skipped when it already finished); returns its eval_results.json."""
    results = run_dir / "eval_results.json"
    if results.exists():
        logger.info("reusing %s", results)
        return results
    command = launch_command(
        launch,
        [
            "--config", str(config), *METHODS[method][0], "--seed", str(seed), "--max-steps", str(steps),
            "--dataset", str(dataset_dir), "--output-dir", str(run_dir),
        ],
    )  # fmt: skip
    logger.info("training %s seed %d: %s", method, seed, shlex.join(command))
    if code := run_child(command):  # Ctrl-C stops the run quietly (cadmtl prints one line)
        raise subprocess.CalledProcessError(code, command)
    return results


def compare_runs(runs: dict[int, dict[str, Path]], model_name: str) -> tuple[str, dict]:
    """The comparison table: the single-task row takes each task from its own single-task model (the tasks whose
    single-task runs were asked for; the others stay empty); a row appears when every seed ran its method(s), so a
    subset of methods (`--methods single-det`) still gives its rows."""
    rows: dict[str, list[dict[str, float]]] = {}
    singles = [
        f"single-{task}"
        for task in TASKS
        if all(f"single-{task}" in seed_runs for seed_runs in runs.values())
    ]
    if singles and runs:
        rows["Single"] = []
        for seed_runs in runs.values():
            # A single-task run only evaluates its own task.
            single = {}
            for method in singles:
                single.update(task_summary(load_results(seed_runs[method]), "test"))
            rows["Single"].append(single)
    for row, method in ROWS.items():
        if runs and all(method in seed_runs for seed_runs in runs.values()):
            rows[row] = [task_summary(load_results(seed_runs[method]), "test") for seed_runs in runs.values()]
    table = comparison_table([(model_name, method, summaries) for method, summaries in rows.items()])
    return table, {"model": model_name, "per_seed": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cadmtl protocol", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="smoke")
    parser.add_argument(
        "--data", type=Path, default=REPO_ROOT.parent / "shared" / "data", help="../shared/data"
    )
    parser.add_argument(
        "--dataset-dir", type=Path, default=None, help="Where the public benchmark repo is built."
    )
    add_output_dir_option(
        parser,
        "folder of the runs and comparison.md / .json (default outputs/protocol-SETTING)",
        required=False,
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--steps-per-task", type=int, default=None)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=None,
        help="A subset of the methods (default: the setting's; all but cpu-pretrained run every method).",
    )
    parser.add_argument("--config", type=Path, default=None, help="Training config (default: the setting's).")
    parser.add_argument("--model-name", default=None, help="Row name in the table (default: the backbone).")
    parser.add_argument("--launch-args", default="", help="Extra `accelerate launch` arguments, one string.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    config, steps, limit, seeds, setting_methods = SETTINGS[args.setting]
    config = args.config or REPO_ROOT / config
    steps = args.steps_per_task or steps
    seeds = args.seeds or seeds
    dataset_dir = args.dataset_dir or Path("outputs") / f"public-benchmark{'-smoke' if limit else ''}"
    output_dir = args.output_dir or Path("outputs") / f"protocol-{args.setting}"
    build_public_repo(dataset_dir, args.data, limit)

    chosen = args.methods or setting_methods
    methods = [method for method in METHODS if chosen is None or method in chosen]
    runs: dict[int, dict[str, Path]] = {}
    for seed in seeds:
        for method in methods:
            budget = METHODS[method][1] * steps
            run_dir = output_dir / method / f"seed{seed}"
            runs.setdefault(seed, {})[method] = train(
                run_dir, config, method, seed, budget, dataset_dir, shlex.split(args.launch_args)
            )
    import yaml

    model_name = args.model_name or str(yaml.safe_load(Path(config).read_text()).get("backbone", "CadMtl"))
    table, data = compare_runs(runs, model_name.split("/")[-1])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "comparison.md").write_text(table)
    (output_dir / "comparison.json").write_text(
        json.dumps(
            {
                **data,
                "steps_per_task": steps,
                "steps": {method: METHODS[method][1] * steps for method in methods},
                "seeds": seeds,
            },
            indent=2,
        )
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
